# hark task runner. `make demo` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo check unit test bench faust-probe chaos load soak up down status clean

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt constraints.txt pyproject.toml broker/pom.xml
	@command -v java >/dev/null || { echo "hark needs Java 17+ for its Kafka broker (apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "hark fetches its Kafka broker with Maven (apt-get install maven)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	rm -rf $(VENV)/kafka/libs
	mvn -q -B -f broker/pom.xml dependency:copy-dependencies -DoutputDirectory=$(CURDIR)/$(VENV)/kafka/libs
	$(BIN)/python -m hark.registry install  # Apicurio Registry, checked against its SHA-1; needs Java 21+
	$(BIN)/pip install -q -r requirements-dev.txt -c constraints.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip uninstall -q -y torchcodec  # CUDA-linked, unusable here; the diarizer passes tensors
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m hark.broker archive  # the JVM maps these classes at every broker start
	$(BIN)/hark models install
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/hark run data/speech/austen_passage.flac data/speech/forever_input_2_16k.wav \
	  data/conversations/conv_2spk_clean.flac --json .hark/demo.jsonl

# The browser test drives Debian's Chromium through playwright (its own browser downloads are
# unreachable here); installed once, with sudo when not root.
CHROMIUM_STAMP := $(VENV)/.chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM_STAMP):
	command -v chromium >/dev/null || $(SUDO) apt-get install -y -q --no-install-recommends chromium \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium)
	touch $@

# Stock readers of the published tier (tests/test_connect.py): a standalone Kafka Connect worker,
# Debezium's JDBC sink and Apicurio's AvroConverter, each plugin in its own folder (Connect gives
# every plugin its own class loader), and the Java consumer and producer of clients/java.
# PostgreSQL is Debian's.
CONNECT_STAMP := $(VENV)/.connect
CONNECT := $(CURDIR)/$(VENV)/connect
$(CONNECT_STAMP): connect/pom.xml clients/java/pom.xml $(wildcard clients/java/src/main/java/dev/hark/client/*.java)
	@command -v mvn >/dev/null || { echo "the Connect tests fetch their jars with Maven (apt-get install maven)"; exit 1; }
	@command -v javac >/dev/null || { echo "the Java client needs a JDK 17+ (apt-get install openjdk-17-jdk-headless)"; exit 1; }
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || $(SUDO) apt-get install -y -q --no-install-recommends postgresql \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends postgresql)
	rm -rf $(CONNECT)
	mvn -q -B -f connect/pom.xml -P worker dependency:copy-dependencies -DoutputDirectory=$(CONNECT)/worker
	mvn -q -B -f connect/pom.xml -P jdbc dependency:copy-dependencies -DoutputDirectory=$(CONNECT)/plugins/debezium-jdbc
	mvn -q -B -f connect/pom.xml -P apicurio dependency:copy-dependencies -DoutputDirectory=$(CONNECT)/plugins/apicurio-converter
	# Apicurio's converter jar lists itself in no ServiceLoader manifest; with one beside it the
	# worker finds every plugin by manifest (plugin.discovery=service_load) instead of scanning
	# each class of every jar (11 s of a 16 s start here)
	mkdir -p $(CONNECT)/manifest/META-INF/services
	echo io.apicurio.registry.utils.converter.AvroConverter > $(CONNECT)/manifest/META-INF/services/org.apache.kafka.connect.storage.Converter
	jar cf $(CONNECT)/plugins/apicurio-converter/hark-converter-manifest.jar -C $(CONNECT)/manifest META-INF
	rm -rf $(CONNECT)/manifest
	mvn -q -B -f clients/java/pom.xml -Dhark.build=$(CONNECT)/client package
	touch $@

# Lint, format and types: the library, the CLI, the services, the benchmarks and the tests.
check: $(STAMP)
	$(BIN)/ruff check hark hark_cli services tests bench
	$(BIN)/ruff format --check hark hark_cli services tests bench
	$(BIN)/mypy hark hark_cli services bench tests

# The tests without a broker or models (seconds).
unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e" tests/test_units.py tests/test_serde.py tests/test_keys.py tests/test_fuzz.py tests/test_results_parts.py tests/test_pacing.py tests/test_published_parts.py tests/test_record.py tests/test_docs.py tests/test_runtime.py tests/test_caption_timeline.py

# In random order (pytest-randomly prints its seed; `pytest --randomly-seed=N` repeats an order).
test: $(STAMP) $(CHROMIUM_STAMP) $(CONNECT_STAMP) check
	$(BIN)/python -m pytest -q

bench: $(STAMP) $(CHROMIUM_STAMP)
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.captions
	$(BIN)/python -m bench.record
	$(BIN)/python -m bench.diarization
	$(BIN)/python -m bench.diarization --hall
	$(BIN)/python -m bench.online_search
	$(BIN)/python -m bench.decode_cost
	$(BIN)/python -m bench.redecode
	$(BIN)/python -m bench.windows
	$(BIN)/python -m bench.draft_batch
	$(BIN)/python -m bench.broker
	$(BIN)/python -m bench.registry
	$(BIN)/python -m bench.published
	$(BIN)/python -m bench.merge_state --minutes 60
	$(BIN)/python -m bench.sealing
	$(BIN)/python -m bench.vocabulary
	$(BIN)/python -m bench.languages
	$(BIN)/python -m bench.admission
	$(BIN)/python -m bench.flood
	# the figures behind defaults and decisions (docs/measurements.md, docs/decisions/stack-choices.md)
	$(BIN)/python -m bench.prompt_hints
	$(BIN)/python -m bench.encoder_pad --pads 30,2 --temperatures both
	$(BIN)/python -m bench.voices

# docs/decisions/0003: faust-streaming's exactly_once against hark's broker. faust-streaming is no
# hark dependency, so the probe runs in a virtual environment of its own, with hark's Kafka jars.
FAUST_VENV := .hark/faust-venv
faust-probe: $(STAMP)
	test -x $(FAUST_VENV)/bin/python || $(PYTHON) -m venv $(FAUST_VENV)
	$(FAUST_VENV)/bin/pip install -q faust-streaming==0.15.3 aiokafka==0.14.0 confluent-kafka==2.16.1
	HARK_KAFKA_LIBS=$(CURDIR)/$(VENV)/kafka/libs PYTHONPATH=$(CURDIR) $(FAUST_VENV)/bin/python -m bench.faust_probe

# Fault injection at a larger scale than CI's: every service killed mid-stream, the embedded broker
# killed, the audio leader of a three-broker cluster killed.
chaos: $(STAMP)
	HARK_CHAOS_STREAMS=$${HARK_CHAOS_STREAMS:-20} HARK_CHAOS_BROKER_STREAMS=$${HARK_CHAOS_BROKER_STREAMS:-10} \
	  HARK_CHAOS_CLUSTER_STREAMS=$${HARK_CHAOS_CLUSTER_STREAMS:-10} \
	  $(BIN)/python -m pytest -q -s tests/test_chaos.py

# The largest number of concurrent real-time streams with partial p95 <= 1 s and zero loss.
load: $(STAMP)
	$(BIN)/python -m bench.load $(LOAD_ARGS)

# A stack that lasts: 12 online-only real-time streams for 60 minutes; broker CPU and every
# process's RSS flat (last 10 minutes against the first 10), partial p95 <= 1 s every minute.
soak: $(STAMP)
	$(BIN)/python -m bench.load --online 12 --full "" --minutes 60 --soak $(SOAK_ARGS)

up: $(STAMP)
	$(BIN)/hark up
down:
	$(BIN)/hark down
status:
	$(BIN)/hark status

clean:
	rm -rf $(VENV) .hark
