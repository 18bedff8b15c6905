"""The ``hark`` command."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys

from hark import kafka, stack
from hark.audio import AudioError
from hark.config import ConfigError

from . import clients, transcripts, voices
from .common import add_bootstrap, connect, settings_of
from .display import Display, caption_line, report_runs


# ---- stack -------------------------------------------------------------------------------------
def cmd_up(a) -> int:
    s = settings_of(a)
    if a.bootstrap:
        s.bootstrap = a.bootstrap
    state = stack.launch(s, replicas=a.replicas, external_broker=bool(a.bootstrap), extra=a.extra)
    print(f"hark stack up: broker {state['bootstrap']}, ingest {state.get('ingest_url')}, archive {state['archive']}")
    if state.get("captions_url"):
        print(f"captions page (press Record to caption your voice), search, exports: {state['captions_url']}")
    print(f"state and logs in {stack.stack_dir(s)}; `hark status`, `hark down`")
    return 0


def cmd_down(a) -> int:
    d = stack.stack_dir(settings_of(a))
    print("hark stack stopped" if stack.stop(d) else "hark: no stack was running")
    return 0


def cmd_status(a) -> int:
    state = stack.status(stack.stack_dir(settings_of(a)))
    if a.json:
        print(json.dumps(state, indent=1))
        return 0 if state and state.get("supervisor_alive") else 1
    if not state or not state.get("supervisor_alive"):
        print("hark: no stack is running")
        return 1
    registry = f"  schema registry {state['schema_registry_url']}" if state.get("schema_registry_url") else ""
    print(f"stack {state['status']}  broker {state['bootstrap']}{registry}  archive {state['archive']}")
    print(f"{'service':<12} {'replica':>7} {'pid':>8} {'health':>10} {'partitions':>10} {'restarts':>8}")
    for jvm in (state.get("broker"), state.get("registry")):
        if jvm:
            print(f"{jvm['name']:<12} {0:>7} {jvm['pid']:>8} {jvm['health']:>10} {'-':>10} {jvm['restarts']:>8}")
    for svc in state["services"]:
        parts = svc.get("partitions_assigned")
        print(
            f"{svc['name']:<12} {svc['replica']:>7} {svc['pid']:>8} {svc['health']:>10} "
            f"{'-' if parts is None or svc['name'] == 'ingest' else parts:>10} {svc['restarts']:>8}"
        )
    for topic, n in (state.get("topics") or {}).items():
        print(f"topic {topic}: {n} partitions")
    for group, lag in (state.get("lag") or {}).items():
        if "error" in lag:
            print(f"group {group}: {lag['error']}")
            continue
        parts = "  ".join(
            f"{r['topic'].rsplit('.', 1)[-1]}[{r['partition']}]={r['lag']}" for r in lag["partitions"] if r["lag"]
        )
        print(f"group {group}: lag {lag['lag']} records{'  ' + parts if parts else ''}")
    return 0


# ---- producing and following ---------------------------------------------------------------------
def cmd_publish(a) -> int:
    from services.ingest.core import Ingest

    s = connect(a, settings_of(a))
    if a.stream_id and len(a.files) > 1:
        raise SystemExit("hark: --stream-id needs exactly one file")
    ingest, failed = Ingest(s), 0
    for f in a.files:
        try:
            summary = ingest.publish_file(
                f,
                stream_id=a.stream_id,
                tenant=a.tenant,
                realtime=a.realtime,
                metadata=_metadata(a),
                language=a.language,
                hotwords=a.hotwords,
            )
            print(f"{summary.stream_id}\t{summary.chunks} chunks\t{summary.duration_s:.2f} s\t{f}")
        except AudioError as e:
            print(f"hark: {f}: {e.reason}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _metadata(a) -> dict:
    """--meta KEY=VALUE... and --speakers N into the stream metadata (StreamStart)."""
    out = {}
    for item in getattr(a, "meta", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"hark: --meta takes KEY=VALUE, got {item!r}")
        out[key] = value
    if getattr(a, "speakers", None):
        out["num_speakers"] = str(a.speakers)
    return out


LANGUAGE_HELP = "the audio's language, a BCP 47 tag (en, es-MX); auto: the offline pass detects it"
HOTWORDS_HELP = 'terms the audio is likely to contain, comma separated ("metoprolol,lisinopril")'


def cmd_tail(a) -> int:
    from hark.keys import Keyring

    from .session import read_results

    s = connect(a, settings_of(a))
    c = kafka.tail_consumer(s, s.results_topic, from_beginning=a.from_beginning)
    keys = Keyring.for_settings(s)
    where = "the beginning" if a.from_beginning else "now"
    print(f"hark: following {s.results_topic} from {where} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    display = Display(sys.stdout)
    try:
        while True:
            for rec in read_results(c, 0.2, keys):
                if a.stream and rec["stream_id"] != a.stream:
                    continue
                kind, prefix = str(rec["kind"]), "" if a.stream else f"[{rec['stream_id']}] "
                if kind == "PARTIAL" and display.tty:  # a draft's words that may still change: dimmed
                    text = f"\x1b[2m{rec['text']}\x1b[0m" if rec["source"] == "provisional" else rec["text"]
                    sys.stdout.write(f"\r\x1b[2K{prefix}{text}")
                    sys.stdout.flush()
                elif kind == "FINAL":
                    display.commit(f"{prefix}{caption_line(rec)}")
                elif kind == "STREAM_COMPLETE":
                    display.commit(f"{prefix}-- stream complete ({rec['status']}) --")
                    if a.stream and a.exit_on_complete:
                        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        c.close()


def _run_session(a, make_runs) -> int:
    from services.ingest.core import Ingest

    from .session import follow

    s = settings_of(a)
    started = None
    if a.bootstrap:
        s = stack.owner_of(s, a.bootstrap)
        kafka.ensure_topics(s)
    else:
        name = f"run-{os.getpid()}"
        state = stack.launch(s, name=name, parent_pid=os.getpid(), ephemeral=True)
        s, started = stack.client_settings(s, state), stack.stack_dir(s, name)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    ingest = None
    try:
        ingest = Ingest(s)
        runs = make_runs(ingest, s)
        follow(s, runs, Display(quiet=a.quiet), stall_timeout_s=a.stall_timeout)
    except KeyboardInterrupt:
        print("hark: interrupted", file=sys.stderr)
        return 130
    finally:
        if ingest is not None:  # close our producer before its broker goes away
            ingest.producer.flush(10)
            ingest.producer.close()
        if started:
            stack.stop(started)
            if a.verbose:
                print(f"the run's stack, its logs included, is kept in {started}", file=sys.stderr)
            else:  # the run's own stack goes with it, interrupted or not
                shutil.rmtree(started, ignore_errors=True)
    failed = report_runs([r.summary() for r in runs], a.json)
    if failed and started and not a.verbose:
        print("(`hark -v run ...` keeps the run's stack and its services' logs)", file=sys.stderr)
    return 1 if failed else 0


def cmd_run(a) -> int:
    from .session import file_runs

    return _run_session(
        a,
        lambda ingest, s: file_runs(
            ingest,
            a.files,
            not a.fast,
            s,
            tenant=a.tenant,
            metadata=_metadata(a),
            language=a.language,
            hotwords=a.hotwords,
        ),
    )


def cmd_replay(a) -> int:
    from hark.records import new_stream_id
    from services.ingest.replay import replay

    from .session import StreamRun

    def make(ingest, s):
        new_id = a.as_id or new_stream_id(f"{a.stream_id}-replay")

        def publish(run):
            return replay(ingest, a.stream_id, new_id=new_id, realtime=not a.fast, on_chunk=run.on_chunk)

        return [StreamRun(f"replay:{a.stream_id}", new_id, publish, s.chunk_ms)]

    return _run_session(a, make)


def _stream_opts(sp) -> None:
    """What a published stream carries, for `hark publish` and `hark run` alike."""
    sp.add_argument(
        "--meta", action="append", metavar="KEY=VALUE", help="stream metadata (repeatable), e.g. max_speakers=4"
    )
    sp.add_argument("--speakers", type=int, help="number of speakers, a hint for the diarizer")
    sp.add_argument("--language", default="auto", help=LANGUAGE_HELP)
    sp.add_argument("--hotwords", help=HOTWORDS_HELP)


def _session_opts(sp) -> None:
    """How `hark run` and `hark replay` follow their streams."""
    sp.add_argument("--json", metavar="OUT", help="write one JSON object per stream per line")
    sp.add_argument("--fast", action="store_true", help="publish as fast as possible, not at real time")
    sp.add_argument("--quiet", action="store_true", help="no live captions/progress")
    sp.add_argument("--tenant", default="default")
    sp.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="fail a stream only when the pipeline has not moved for S seconds (default 120)",
    )
    add_bootstrap(sp)


def _stack_commands(sub) -> None:
    up = sub.add_parser("up", help="start the embedded stack (broker, archive, services) in the background")
    up.add_argument("--replicas", default="", help="e.g. online_asr=2")
    up.add_argument(
        "--with", dest="extra", default="", metavar="NAMES", help="opt-in services to run too, e.g. activity"
    )
    up.add_argument("--partitions", type=int, help="partitions per topic (default 8)")
    up.add_argument("--bootstrap", help="run the services against this Kafka cluster instead of an embedded broker")
    up.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop what `hark up` started").set_defaults(fn=cmd_down)
    st = sub.add_parser("status", help="services, pids, health and topic partitions")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)


def _stream_commands(sub) -> None:
    pub = sub.add_parser("publish", help="publish audio files as streams")
    pub.add_argument("files", nargs="+")
    pub.add_argument("--stream-id")
    pub.add_argument("--tenant", default="default")
    pub.add_argument("--realtime", action="store_true", help="pace chunks at real time")
    _stream_opts(pub)
    add_bootstrap(pub)
    pub.set_defaults(fn=cmd_publish)

    tail = sub.add_parser("tail", help="live captions from the results topic")
    tail.add_argument("--stream")
    tail.add_argument("--from-beginning", action="store_true")
    tail.add_argument("--exit-on-complete", action="store_true", help="with --stream: stop when it completes")
    add_bootstrap(tail)
    tail.set_defaults(fn=cmd_tail)

    run = sub.add_parser("run", help="transcribe files end to end (starts the embedded stack unless --bootstrap)")
    run.add_argument("files", nargs="+")
    _stream_opts(run)
    _session_opts(run)
    run.set_defaults(fn=cmd_run)

    rp = sub.add_parser("replay", help="re-publish an archived stream through the pipeline")
    rp.add_argument("stream_id")
    rp.add_argument("--as", dest="as_id", help="stream id for the replay")
    _session_opts(rp)
    rp.set_defaults(fn=cmd_replay)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hark", description="Kafka-native speech recognition")
    p.add_argument("--data-dir", help="data folder (default $HARK_DATA_DIR or ~/.local/share/hark)")
    p.add_argument("-v", "--verbose", action="store_true", help="the Kafka client's own log lines; keep a run's stack")
    sub = p.add_subparsers(dest="cmd", required=True)
    _stack_commands(sub)
    _stream_commands(sub)
    transcripts.add_parsers(sub)
    clients.add_parsers(sub)
    voices.add_parser(sub)
    a = p.parse_args(argv)
    kafka.client_log(verbose=a.verbose)
    if a.cmd != "models":  # what hark writes is the user's alone; model weights are the installation's
        os.umask(0o077)  # inherited by every process it starts (the stack's supervisor, broker, services)
    try:
        sys.exit(a.fn(a))
    except ConfigError as e:
        print(f"hark: {e}", file=sys.stderr)
        sys.exit(2)
    except (RuntimeError, TimeoutError) as e:
        print(f"hark: {e}", file=sys.stderr)
        sys.exit(1)
