"""``hark`` commands on what the pipeline keeps: models, search, exports, erasure, retention,
tokens, model comparison, and one service in the foreground."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hark import declaration, kafka

from .common import add_bootstrap, connect, settings_of


def cmd_models(a) -> int:
    from hark import models

    if a.action == "install":
        for line in models.install():
            print(line)
    problems = models.verify()
    for p in problems:
        print(f"hark: model check failed: {p}", file=sys.stderr)
    if not problems:
        print(
            f"models ok: {models.count_files()} files verified by sha256 "
            f"(pocketsphinx en-us; whisper {', '.join(models.WHISPER)})"
        )
    return 1 if problems else 0


def cmd_compare(a) -> int:
    from hark.wer import load_references
    from services.offline_asr.compare import compare, render_table, to_json

    s = settings_of(a)
    refs = load_references(a.refs) if a.refs else {}
    models = [m.strip() for m in a.models.split(",") if m.strip()]

    def progress(row):
        if not a.quiet:
            scores = "  ".join(
                f"{v['model']}: {100 * v['wer']:.1f}%" if "wer" in v else v["model"] for v in row["versions"]
            )
            print(f"{row['stream_id']}  {scores}", file=sys.stderr)

    try:
        report = compare(s, a.replay, models, refs, on_stream=progress)
    except (LookupError, ValueError, FileNotFoundError) as e:
        print(f"hark: {e}", file=sys.stderr)
        return 1
    print(render_table(report))
    if a.json:
        Path(a.json).write_text(to_json(report))
    return 0


def cmd_serve(a) -> int:
    from services.captions.app import serve

    s = connect(a, settings_of(a))
    s.captions_host, s.captions_port = a.host, a.port
    print(f"hark captions on http://{a.host}:{a.port}/ (index {s.index_file})", file=sys.stderr)
    serve(s)
    return 0


def _index(a):
    from services.captions.index import TranscriptIndex

    s = settings_of(a)
    if not s.index_file.exists():
        raise SystemExit(
            f"hark: no transcript index at {s.index_file}; the captions service builds it "
            f"(`hark up` runs it, or `hark serve`)"
        )
    return TranscriptIndex(s.index_file)


def cmd_search(a) -> int:
    idx = _index(a)
    try:
        hits = idx.search(" ".join(a.query), a.stream, a.limit)
    finally:
        idx.close()
    for h in hits:
        if a.json:
            print(json.dumps(h))
        else:
            who = f" {h['speaker']}:" if h["speaker"] else ""
            print(f"{h['stream_id']}  {h['start']:8.2f}-{h['end']:<8.2f} [{h['source']}]{who} {h['text']}")
    return 0 if hits else 1


def cmd_export(a) -> int:
    from services.captions import exports

    idx = _index(a)
    try:
        st, waiting = _wait_for_complete(a, idx) if a.wait > 0 else (idx.stream(a.stream_id), None)
    finally:
        idx.close()
    why = f"nothing moved for {a.wait:g} s (waiting for {waiting})" if waiting else "--wait S to wait for it"
    if not st:
        print(f"hark: no stream {a.stream_id!r} in the transcript index; {why}", file=sys.stderr)
        return 1
    if not st["complete"]:
        print(
            f"hark: stream {a.stream_id!r} has no final transcript yet (status {st['status']}); {why}", file=sys.stderr
        )
        return 1
    body = exports.export(st["complete"], a.format)
    if a.format == "rttm" and not body:
        print(f"hark: stream {a.stream_id!r} has no speaker turns", file=sys.stderr)
    if a.output:
        Path(a.output).write_text(body)
    else:
        sys.stdout.write(body)
    return 0


def _wait_for_complete(a, idx) -> tuple[dict | None, str]:
    """The stream's index entry once complete, waiting while anything moves: its entry, or the
    commits of the pipeline's consumer groups (when a stack is reachable). Gives up after
    ``a.wait`` seconds with nothing moving; returns what it waited for last."""
    import time

    from hark.stack import GROUPS

    from .session import Progress

    try:
        progress: Progress | None = Progress(connect(a, settings_of(a)), list(GROUPS))
    except SystemExit:  # no stack running: the index alone says whether it moves
        progress = None
    seen, moved = None, time.monotonic()
    while True:
        st = idx.stream(a.stream_id)
        if st and st["complete"]:
            return st, ""
        if (st and st["updated_ms"]) != seen:
            seen, moved = st and st["updated_ms"], time.monotonic()
        if progress is not None:
            progress.poll()
            moved = max(moved, progress.moved_at)
        if time.monotonic() - moved >= a.wait:
            return st, progress.waiting_for() if progress else "the transcript index"
        time.sleep(0.3)


def erase_from_index(s):
    """This installation's transcript index (the captions service's store), erased now rather than
    when a captions server reads the tombstone."""
    from services.captions.index import TranscriptIndex

    def erase(stream_id: str) -> int:
        if not s.index_file.exists():
            return 0
        idx = TranscriptIndex(s.index_file)
        try:
            return idx.erase(stream_id)
        finally:
            idx.close()

    return erase


def cmd_erase(a) -> int:
    from hark.erasure import erase
    from hark.keys import open_archive

    s = connect(a, settings_of(a))
    store, producer = open_archive(s), kafka.producer(s, **{"client.id": "hark-erase"})
    for sid in a.stream_ids:
        print(json.dumps(erase(s, sid, store, producer, reason=a.reason, local={"index_rows": erase_from_index(s)})))
    return 0


def cmd_retention(a) -> int:
    from hark.erasure import retention_sweep
    from hark.keys import open_archive
    from hark.voices import VoiceStore

    s = connect(a, settings_of(a))
    if a.days is not None:
        s.archive_retention_days = a.days
    if s.archive_retention_days <= 0 and s.voiceprint_retention_days <= 0:
        raise SystemExit("hark: no retention period: set HARK_ARCHIVE_RETENTION_DAYS or pass --days")
    erased = retention_sweep(s, open_archive(s), kafka.producer(s, **{"client.id": "hark-retention"}))
    voices = VoiceStore(s).sweep()  # biometric data: HARK_VOICEPRINT_RETENTION_DAYS
    for entry in erased + voices:
        print(json.dumps(entry))
    print(f"hark: {len(erased)} streams older than {s.archive_retention_days:g} days erased", file=sys.stderr)
    print(f"hark: {len(voices)} voiceprints older than {s.voiceprint_retention_days:g} days erased", file=sys.stderr)
    return 0


def cmd_token(a) -> int:
    from hark.tenants import AccessDenied, create_token, revoke_tokens, tokens_path

    s = settings_of(a)
    path = a.file or str(tokens_path(s))
    if a.action == "revoke":
        if not Path(path).exists():
            raise SystemExit(f"hark: no tokens file {path}")
        n = revoke_tokens(path, a.tenant)
        print(f"hark: {n} token(s) removed from {path}; servers refuse them within a second", file=sys.stderr)
        return 0 if n else 1
    try:
        token = create_token(path, a.tenant)
    except AccessDenied as e:
        raise SystemExit(f"hark: {e.reason}") from None
    print(token)
    enforced = (
        "ingest and captions with these settings require tokens within a second"
        if Path(path) == tokens_path(s)
        else f"services read it with HARK_TOKENS_FILE={path}"
    )
    print(f"hark: token for tenant {a.tenant!r} added to {path} (only its hash is stored; {enforced})", file=sys.stderr)
    return 0


def cmd_service(a) -> int:
    import importlib

    importlib.import_module(declaration.by_name()[a.name].main).main(a.args)
    return 0


def add_parsers(sub) -> None:
    """The commands of this module, on ``hark``'s subparsers."""
    _transcript_parsers(sub)
    _admin_parsers(sub)
    sv = sub.add_parser("service", help="run one service in the foreground (docker-compose)")
    sv.add_argument("name", choices=list(declaration.by_name()))  # opt-in services too
    sv.add_argument("args", nargs=argparse.REMAINDER)
    sv.set_defaults(fn=cmd_service)


def _transcript_parsers(sub) -> None:
    sv_ = sub.add_parser("serve", help="the captions page, search and export API in the foreground")
    sv_.add_argument("--host", default="127.0.0.1")
    sv_.add_argument("--port", type=int, default=8000)
    add_bootstrap(sv_)
    sv_.set_defaults(fn=cmd_serve)

    se = sub.add_parser("search", help="search transcripts: 1-best and n-best alternatives, best first")
    se.add_argument("query", nargs="+")
    se.add_argument("--stream", help="only this stream")
    se.add_argument(
        "--json", action="store_true", help="JSON lines: stream_id, start, end, speaker, text, marked, source"
    )
    se.add_argument("--limit", type=int, default=20)
    se.set_defaults(fn=cmd_search)

    ex = sub.add_parser("export", help="a stream's final transcript as WebVTT, SubRip, JSON, RTTM or CTM")
    ex.add_argument("stream_id")
    ex.add_argument("--format", required=True, choices=["vtt", "srt", "json", "rttm", "ctm"])
    ex.add_argument("-o", "--output", help="file (default stdout)")
    ex.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="wait for the final transcript while the pipeline moves; give up after S seconds with nothing moving",
    )
    ex.set_defaults(fn=cmd_export)

    cp = sub.add_parser("compare", help="re-decode archived streams with two offline model versions: WER / agreement")
    cp.add_argument("--replay", nargs="+", required=True, metavar="STREAM_ID", help="archived stream ids")
    cp.add_argument(
        "--models",
        default="base,tiny.en",
        help="comma-separated: model names or CTranslate2 folders; the first is the baseline for agreement",
    )
    cp.add_argument("--refs", help="TSV of (stream id or source file name) TAB reference text")
    cp.add_argument("--json", metavar="OUT", help="also write the report, with every stream's texts, as JSON")
    cp.add_argument("--quiet", action="store_true", help="no per-stream progress on stderr")
    cp.set_defaults(fn=cmd_compare)


def _admin_parsers(sub) -> None:
    md = sub.add_parser("models", help="model weights")
    md.add_argument("action", choices=["install", "verify"], help="install: assemble split weights, then verify")
    md.set_defaults(fn=cmd_models)

    er = sub.add_parser("erase", help="forget streams: archived audio, search entries, results (tombstone), audited")
    er.add_argument("stream_ids", nargs="+", metavar="STREAM_ID")
    er.add_argument("--reason", default="request", help="recorded in the audit log")
    add_bootstrap(er)
    er.set_defaults(fn=cmd_erase)

    rt = sub.add_parser("retention", help="erase archived streams older than the retention period now")
    rt.add_argument("--days", type=float, help="default $HARK_ARCHIVE_RETENTION_DAYS")
    add_bootstrap(rt)
    rt.set_defaults(fn=cmd_retention)

    tk = sub.add_parser("token", help="tenant tokens for ingest and the captions server")
    tk.add_argument("action", choices=["create", "revoke"])
    tk.add_argument("tenant", help="create: the tenant; revoke: a token, or a tenant (all its tokens)")
    tk.add_argument("--file", help="tokens file (default $HARK_TOKENS_FILE or <data dir>/tokens)")
    tk.set_defaults(fn=cmd_token)
