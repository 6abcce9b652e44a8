import re

import pytest

from bnet.config import Categorical, Range, load_project_config, read_behavenet_json
from bnet.errors import ConfigError
from bnet.tuning.space import SearchSpace


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_scalars_lists_and_ranges(tmp_path):
    path = write(tmp_path, "p.yaml", """
experiment: demo
data: {data: x.hdf5, trial_splits: "8;1;1;0"}
model:
  model_class: ae
  n_ae_latents: [4, 8, 12]
  l2_reg: {low: 1.0e-6, high: 1.0e-2, log: true}
  rng_seed_model: [3]
training: {learning_rate: {low: 0.0001, high: 0.001}, max_n_epochs: {low: 2, high: 10, step: 2}}
tuning: {n_trials: 7, sampler: random}
""")
    config = load_project_config(path)
    assert config.experiment == "demo" and config.tuning.n_trials == 7 and config.tuning.sampler == "random"
    dims = config.dimensions()
    assert dims["n_ae_latents"] == Categorical((4, 8, 12))
    assert dims["l2_reg"] == Range(1e-6, 1e-2, log=True)
    assert dims["max_n_epochs"].is_int and not dims["learning_rate"].is_int
    fixed = config.fixed()
    assert fixed["rng_seed_model"] == 3 and fixed["data"] == "x.hdf5" and fixed["trial_splits"] == "8;1;1;0"
    assert SearchSpace({"n": dims["n_ae_latents"], "e": dims["max_n_epochs"]}).grid() == {"n": [4, 8, 12], "e": [2, 4, 6, 8, 10]}
    with pytest.raises(ConfigError, match="--sampler grid needs 'l2_reg' to be a list or a range with a step"):
        SearchSpace(dims).grid()


@pytest.mark.parametrize("text, message", [
    ("model: {n_latents: 4}", "unknown key 'n_latents' in section 'model'"),
    ("training: {learning_rat: 0.1}", "unknown key 'learning_rat' in section 'training'"),
    ("modle: {}", "unknown section 'modle'"),
    ("model: {n_ae_latents: []}", "'n_ae_latents' is an empty list"),
    ("model: {l2_reg: {low: 1.0, high: 0.1}}", r"'l2_reg' range is empty \(low 1.0 > high 0.1\)"),
    ("model: {l2_reg: {low: 0.0, high: 0.1, log: true}}", "log range needs low > 0"),
    ("model: {l2_reg: {lo: 0.0, hi: 0.1}}", "must be a scalar, a list, or a mapping"),
    ("tuning: {n_trials: 0}", "n_trials must be at least 1"),
    ("tuning: {sampler: hillclimb}", "tuning.sampler 'hillclimb'"),
    ("tuning: {trials: 3}", "unknown key 'trials' in section 'tuning'"),
    ("[1, 2]", "expected a mapping of sections"),
])
def test_bad_configs_name_key_and_section(tmp_path, text, message):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError, match=message) as err:
        load_project_config(path)
    assert "bad.yaml" in str(err.value) or "tuning" in message or "n_trials" in message


def test_behavenet_json_configs_load_unchanged(tmp_path):
    model = write(tmp_path, "ae_model.json", """{
"experiment_name": "latent_search", # type: str
"model_type": "conv", # type: str, help: conv or linear
"n_ae_latents": [4, 8, 12, 16], # type: int, help: number of latents
"l2_reg": 0.0, # type: float
"rng_seed_model": 0, # type: int, help: control model initialization
"fit_sess_io_layers": false, # type: boolean
"ae_arch_json": null, # type: str, help: "#" inside strings is kept
"model_class": "ae" # type: str
}""")
    training = write(tmp_path, "ae_training.json", """{
"export_train_plots": true, "export_latents": true, "export_latents_best": false, "sessions_csv": "",
"val_check_interval": 1, "learning_rate": 1e-4, "max_n_epochs": 1000, "min_n_epochs": 500,
"enable_early_stop": true, "early_stop_history": 10, "as_numpy": false, "batch_load": true,
"rng_seed_data": 0, "train_frac": 1.0, "trial_splits": "8;1;1;0"
}""")
    compute = write(tmp_path, "ae_compute.json", '{"device": "cuda", "gpus_viz": "0;1", "tt_n_cpu_workers": 5, "mem_limit_gb": 8.0,}')
    data = write(tmp_path, "data.json", '{"lab": "musall", "expt": "vistrained", "animal": "mSM30", "session": "10-Oct-2017", "n_input_channels": 2, "y_pixels": 128, "x_pixels": 128, "use_output_mask": false, "neural_bin_size": null, "neural_type": "ca", "approx_batch_size": 200,}')
    config = load_project_config(None, {"data": data, "model": model, "training": training, "compute": compute})
    assert config.experiment == "latent_search"
    assert config.dimensions() == {"n_ae_latents": Categorical((4, 8, 12, 16))}
    assert config.fixed()["lab"] == "musall" and config.fixed()["device"] == "cuda"
    assert read_behavenet_json(model)["ae_arch_json"] is None


def test_behavenet_json_unknown_key_names_file(tmp_path):
    path = write(tmp_path, "m.json", '{"model_class": "ae", "n_hidden": 3}')
    with pytest.raises(ConfigError, match=r"m.json: unknown key 'n_hidden' in section 'model'"):
        load_project_config(None, {"model": path})


def test_behavenet_json_strings_keep_what_looks_like_comments_and_commas(tmp_path):
    """The hand-written comment stripper read the escaped backslash as escaping the quote (and
    cut the rest of the line as a comment) and took ',]' inside a string for a trailing comma."""
    path = write(tmp_path, "d.json", '{"data_dir": "C:\\\\data\\\\", # c\n "lab": "a,]", // x\n "expt": [1, 2,],}')
    assert read_behavenet_json(path) == {"data_dir": "C:\\data\\", "lab": "a,]", "expt": [1, 2]}
    continued = write(tmp_path, "c.json", '{"lab": "a \\\n# b", # c\n}')  # JSON5: a string over two lines
    assert read_behavenet_json(continued) == {"lab": "a # b"}


def test_broken_json_is_a_clear_error(tmp_path):
    path = write(tmp_path, "m.json", '{"model_class": "ae" "x": 1}')
    with pytest.raises(ConfigError, match="m.json: not valid JSON"):
        read_behavenet_json(path)


@pytest.mark.parametrize("text, message", [
    ("data: {subsample_idxs_group_1: b}", "'subsample_idxs_group_1: b' is refused"),
    ("tuning: {n_trials: '5'}", "'n_trials' must be an integer or null, got '5'"),
    ("tuning: {seed: 1.5}", "'seed' must be an integer or null, got 1.5"),
])
def test_keys_bnet_cannot_honour_are_refused_not_dropped(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_project_config(write(tmp_path, "k.yaml", text))


def test_behavenet_machinery_keys_are_accepted_with_a_note(tmp_path):
    config = load_project_config(write(tmp_path, "k.yaml", "compute: {gpus_viz: '0;1', tt_n_cpu_workers: 4}\n"
                                                           "model: {ae_arch_json: null, fit_sess_io_layers: false}"))
    assert "gpus_viz" not in config.values and config.values["ae_arch_json"] is None
    assert len(config.notes) == 2 and all("accepted and ignored" in note for note in config.notes)
    assert "pick GPUs with CUDA_VISIBLE_DEVICES" in config.notes[0]


def test_yaml_exponents_without_a_dot_are_floats(tmp_path):
    config = load_project_config(write(tmp_path, "f.yaml", "training: {learning_rate: 1e-4, max_n_epochs: 3}\n"
                                                           "model: {l2_reg: {low: 1e-6, high: 1e-2, log: true}}"))
    assert config.values["learning_rate"] == 1e-4 and config.values["l2_reg"] == Range(1e-6, 1e-2, log=True)
