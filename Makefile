# Two commands (see README): `make demo` sets up and runs the demo end to end,
# `make test` sets up and runs the tests. Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.bnet-installed
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install demo demo-mouse test bench ui clean

# torch first and pinned (constraints.txt: the versions CI tests): 2.13.0 is the CPU wheel on
# disk; any other spec pulls GBs of CUDA.
$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,pbt]'
	touch $@

install: $(INSTALLED)

demo: install
	$(BIN)/bnet data synth demo-data/demo.hdf5 --n-trials 40 --n-frames 50 --y-pixels 32 --x-pixels 32
	$(BIN)/bnet tune ae --config projects/demo/ae.yaml
	$(BIN)/bnet best ae --experiment ae-demo --top 3
	$(BIN)/bnet register ae --experiment ae-demo --name ae-demo --alias champion
	$(BIN)/bnet tune arhmm --data demo-data/demo.hdf5 --ae-experiment ae-demo --ae best --config projects/demo/arhmm.yaml
	$(BIN)/bnet best arhmm --experiment arhmm-demo --top 3
	$(BIN)/bnet tune decoder --data demo-data/demo.hdf5 --target ae --ae-experiment ae-demo --config projects/demo/decoder.yaml
	$(BIN)/bnet ensemble --experiment decoder-demo --max-members 4 --name decoder-demo-ensemble
	$(BIN)/bnet tune decoder --data demo-data/demo.hdf5 --target arhmm --arhmm-experiment arhmm-demo --config projects/demo/state-decoder.yaml
	$(BIN)/bnet tune bayesian-decoder --data demo-data/demo.hdf5 --arhmm-experiment arhmm-demo \
		--decoder-experiment decoder-demo --state-decoder-experiment state-decoder-demo --config projects/demo/bayesian-decoder.yaml
	$(BIN)/bnet plot bayesian-decoder best --experiment bayesian-decoder-demo --out demo-data/bayesian-decoder.mp4 --log
	$(BIN)/bnet plot reconstruction models:/ae-demo@champion --out demo-data/ae-reconstruction.mp4 --log
	$(BIN)/bnet plot syllables best --experiment arhmm-demo --out demo-data/syllables.mp4 --log
	$(BIN)/bnet plot samples best --experiment arhmm-demo --out demo-data/samples.mp4 --log
	$(BIN)/bnet plot decoder best --experiment decoder-demo --out demo-data/decoder.mp4 --log
	$(BIN)/bnet report ae-demo --out demo-data/report-ae-demo.html
	$(BIN)/bnet tune pipeline --config projects/demo/pipeline.yaml
	$(BIN)/bnet report pipeline-demo --out demo-data/report-pipeline-demo.html
	$(BIN)/bnet tune ae --config projects/demo/ae-pbt.yaml
	$(BIN)/bnet data synth demo-data/demo-day2.hdf5 --n-trials 10 --n-frames 50 --y-pixels 32 --x-pixels 32 --recording-seed 1
	$(BIN)/bnet register arhmm --experiment arhmm-demo --name arhmm-demo --alias champion
	$(BIN)/bnet apply pipeline --arhmm models:/arhmm-demo@champion --data demo-data/demo-day2.hdf5 --out demo-data/applied
	$(BIN)/bnet apply decoder best --model-experiment decoder-demo --data demo-data/demo-day2.hdf5 --out demo-data/applied
	$(BIN)/bnet plot reconstruction models:/ae-demo@champion --data demo-data/demo-day2.hdf5 --out demo-data/ae-day2.mp4
	$(BIN)/python projects/demo/pyfunc_predict.py bnet-store demo-data/demo-day2.hdf5 \
		demo-data/applied/synthetic_bnet-synth_seed0_demo-day2.latents.hdf5

# The demo's AE on the real mirror-mouse video (no neural data recorded with it: AE and ARHMM only).
demo-mouse: install
	$(BIN)/bnet data build --video ../shared/data/lp_mirror_mouse/videos/test_vid.mp4 --out demo-data/mouse.hdf5 \
		--y-pixels 64 --x-pixels 64 --trial-length 10 --overwrite
	$(BIN)/bnet tune ae --config projects/demo/ae-mouse.yaml
	$(BIN)/bnet register ae --experiment ae-mouse --name ae-mouse --alias champion
	$(BIN)/bnet plot reconstruction models:/ae-mouse@champion --out demo-data/mouse-reconstruction.mp4 --log
	$(BIN)/bnet tune arhmm --data demo-data/mouse.hdf5 --ae models:/ae-mouse@champion --config projects/demo/arhmm.yaml \
		--experiment arhmm-mouse
	$(BIN)/bnet report ae-mouse --out demo-data/report-ae-mouse.html

# the slowest tests listed at the end: CI's time limit is watched from its log
test: install
	$(BIN)/pytest -q -n auto --dist loadfile --durations=15

# The tests where the training precision matters, again with bf16 autocast forced wherever
# `compute.precision` is auto (BNET_PRECISION): any CPU runs it, natively or emulated.
# The end-to-end CLI runs of every class are left out (the direct per-class test trains each
# in both precisions); the multi-session msps-vae study, which bf16 broke, is kept.
BF16_TESTS := tests/test_ae_family.py tests/test_training.py tests/test_throughput.py
BF16_SELECT := not test_every_class_tunes and not fly and not architectures_from_json and not a_study_optimises \
	and not plateau and not reaches_the_float32_val_loss
.PHONY: test-bf16
test-bf16: install
	BNET_PRECISION=bf16 $(BIN)/pytest -q $(BF16_TESTS) -k "$(BF16_SELECT)"

bench: install
	$(BIN)/python bench/ae_throughput.py
	$(BIN)/python bench/tracking_overhead.py
	$(BIN)/python bench/arhmm_em.py
	$(BIN)/python bench/arhmm_science.py
	$(BIN)/python bench/decoder_ensemble.py
	$(BIN)/python bench/workers_scaling.py
	$(BIN)/python bench/data_build.py

ui: install
	$(BIN)/bnet ui

clean:
	rm -rf bnet-store demo-data
