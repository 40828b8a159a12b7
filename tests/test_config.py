"""Run-config validation, overrides and flattening."""

import pytest

from metalearner import config
from metalearner.config import ConfigError, apply_overrides, flatten, load_run_config, parse_override


def test_defaults_resolve():
    cfg = load_run_config({})
    assert cfg.task.name == "text" and cfg.controller["name"] == "ewma" and cfg.train.steps == 300


def test_round_trip_through_dict():
    cfg = load_run_config({"task": {"name": "recall", "distance": 32}, "model": {"preset": "tiny", "d_model": 48},
                           "controller": {"name": "ewma", "factor": 1.02}})
    again = load_run_config(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("data,field", [
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"steps": "many"}}, "train.steps"),
    ({"train": {"stepz": 5}}, "train.stepz"),
    ({"train": {"lr": -1.0}}, "train.lr"),
    ({"train": {"device": "tpu"}}, "train.device"),
    ({"task": {"name": "vision"}}, "task.name"),
    ({"task": {"name": "recall", "distance": 4}}, "task.distance"),
    ({"task": {"name": "text", "files": ["/nonexistent/a.txt"]}}, "task.files"),
    ({"model": {"preset": "huge"}}, "model.preset"),
    ({"model": {"d_model": 30, "n_heads": 4}}, "model."),
    ({"model": {"colour": "red"}}, "model.colour"),
    ({"controller": {"name": "pid"}}, "controller.name"),
    ({"controller": {"name": "ewma", "factor": 0.99}}, "controller.factor"),
    ({"controller": {"name": "ewma", "beta": 1.0}}, "controller.beta"),
    ({"controller": {"name": "ewma", "threshold": -0.1}}, "controller.threshold"),
    ({"trainer": {}}, "trainer"),
])
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        load_run_config(data)
    msg = str(e.value)
    assert msg.startswith(field), msg
    assert "\n" not in msg


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_override("train.steps=100") == ("train.steps", 100)
    assert parse_override("controller.factor=1.01") == ("controller.factor", 1.01)
    assert parse_override("task.files=a.txt,b.txt") == ("task.files", "a.txt,b.txt")
    data = apply_overrides({"train": {"steps": 5}}, ["train.steps=7", "controller.name=static"])
    assert data == {"train": {"steps": 7}, "controller": {"name": "static"}}
    with pytest.raises(ConfigError, match="--set"):
        parse_override("train.steps")


def test_comma_separated_list_coerces(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x" * 5000)
    b.write_text("y" * 5000)
    cfg = load_run_config(apply_overrides({}, [f"task.files={a},{b}"]))
    assert cfg.task.files == [str(a), str(b)]


def test_flatten_uses_dots():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


@pytest.mark.parametrize("data,field", [
    ({"train": {"weight_decay": float("nan")}}, "train.weight_decay"),
    ({"train": {"lr": float("inf")}}, "train.lr"),
    ({"train": {"steps": True}}, "train.steps"),
    ({"train": {"steps": "5"}}, "train.steps"),
    ({"train": {"steps": 10**9}}, "train.steps"),
    ({"train": {"batch_size": 4096, "seq_len": 4096}}, "train.batch_size"),
    ({"model": {"d_model": 8192, "n_layers": 128}}, "model.d_model"),
    ({"model": {"n_layers": 1000}}, "model.n_layers"),
    ({"model": {"rope_base": float("nan")}}, "model.rope_base"),
    ({"model": {"vocab_size": 100}}, "model.vocab_size"),  # the text task sets it
    ({"task": {"name": "recall"}, "model": {"arch": "decoder"}}, "model.arch"),
    ({"task": {"name": "speech", "data_dir": "x"}, "train": {"seq_len": 64}}, "train.seq_len"),
    ({"controller": {"name": "ewma", "min_window": 200}}, "controller.min_window"),  # > train.seq_len 128
    ({"controller": {"name": "ewma", "beta": float("nan")}}, "controller.beta"),
    ({"controller": {"name": "ewma", "init": 1}}, "controller.init"),
    ({"task": None}, "task"),
    ({"train": 5}, "train"),
    ({"task": {"name": ["recall"]}}, "task.name"),
])
def test_numbers_sizes_and_unhonoured_settings_are_errors(data, field):
    with pytest.raises(ConfigError) as e:
        load_run_config(data)
    assert str(e.value).startswith(field), str(e.value)
    assert "\n" not in str(e.value)


def test_min_window_may_reach_an_explicit_max_seq_len():
    cfg = load_run_config({"model": {"max_seq_len": 256}, "controller": {"name": "ewma", "min_window": 200}})
    assert cfg.controller["min_window"] == 200


def test_task_model_keys_cover_what_the_tasks_dictate():
    from metalearner.config import TASK_MODEL_KEYS
    from metalearner.tasks import RecallConfig, RecallTask, TextConfig, TextTask

    recall = RecallTask(RecallConfig(n_pairs=2, distance=8), batch_size=1, seq_len=16, seed=0)
    text = TextTask(TextConfig(), batch_size=1, seq_len=16, seed=0)
    assert set(recall.model_overrides()) == set(TASK_MODEL_KEYS["recall"])
    assert set(text.model_overrides()) == set(TASK_MODEL_KEYS["text"])


def test_model_limits_name_model_fields():
    import dataclasses

    from metalearner.config import MODEL_LIMITS
    from metalearner.model import ModelConfig

    assert set(MODEL_LIMITS) <= {f.name for f in dataclasses.fields(ModelConfig)}


def test_speech_config_round_trips_without_seq_len(tmp_path):
    (tmp_path / "metadata.csv").write_text("file_name,transcription\n")
    cfg = load_run_config({"task": {"name": "speech", "data_dir": str(tmp_path)}})
    assert "seq_len" not in cfg.to_dict()["train"]
    assert load_run_config(cfg.to_dict()) == cfg


def test_set_indexes_lists_and_checks_keys():
    data = apply_overrides({"arms": [{"name": "a"}, {"name": "b"}]}, ["arms[1].name=c", "arms[0]=1"])
    assert data["arms"] == [1, {"name": "c"}]
    with pytest.raises(ConfigError, match=r"^arms\[5\]: got index 5, expected an index below 2"):
        apply_overrides({"arms": [{}, {}]}, ["arms[5].name=x"])
    with pytest.raises(ConfigError, match="^--set: got key"):
        parse_override("train..steps=1")
    with pytest.raises(ConfigError, match=r"^train\.steps: got 5, cannot set"):
        apply_overrides({"train": {"steps": 5}}, ["train.steps.x=1"])
    assert parse_override("description=2024-02-30") == ("description", "2024-02-30")  # not YAML: a string


def test_read_yaml_refuses_what_is_not_utf8_yaml(tmp_path):
    from metalearner.config import read_yaml

    bad = tmp_path / "a.yaml"
    bad.write_bytes(b"train: {steps: 5}\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"^--config: got .*expected UTF-8 text \(byte 0xe9"):
        read_yaml(bad, "--config")
    bad.write_text("when: 2024-02-30\n")
    with pytest.raises(ConfigError, match="^--config: .* holds a value YAML cannot build"):
        read_yaml(bad, "--config")
    with pytest.raises(ConfigError, match="^--config: got .*expected an existing YAML file"):
        read_yaml(tmp_path / "missing.yaml", "--config")


@pytest.mark.parametrize("task,field", [
    ({"name": "recall", "eval_size": 10**7}, "task.eval_size"),
    ({"name": "recall", "n_keys": 0}, "task.n_keys"),
    ({"name": "text", "val_fraction": 0.7}, "task.val_fraction"),
    ({"name": "text", "files": "a.txt,,"}, "task.files"),  # split to ['a.txt'], which does not exist
])
def test_task_settings_are_bounded(task, field):
    with pytest.raises(ConfigError) as e:
        load_run_config({"task": task})
    assert str(e.value).startswith(field), str(e.value)



def word_level_tokenizer(folder, n_tokens: int) -> str:
    """A tokenizer folder as `tokenizers` writes it (``tokenizer.json``) with ``n_tokens``
    pieces; the size check reads the file, nothing here loads the tokenizer."""
    import json

    folder.mkdir()
    vocab = {f"w{i}": i for i in range(n_tokens - 1)}
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
        "added_tokens": [{"id": n_tokens - 1, "content": "[UNK]", "special": True}]}))
    return str(folder)


def test_the_size_cap_counts_a_configured_tokenizer_s_vocabulary(tmp_path, monkeypatch):
    """With ``task.tokenizer`` the model embeds the tokenizer's ids, not the preset's 256
    (the cap lowered to 1e6 so that a tiny model shows it)."""
    monkeypatch.setattr(config, "MAX_PARAMS", 1_000_000)
    model = {"preset": "tiny"}  # d_model 32, 2 layers: ~33k parameters on bytes
    load_run_config({"task": {"name": "text"}, "model": model})
    with pytest.raises(ConfigError) as e:
        load_run_config({"task": {"name": "text", "tokenizer": word_level_tokenizer(tmp_path / "tok", 100_000)},
                         "model": model})
    assert str(e.value) == ("model.d_model: got 32 with n_layers 2 and vocab_size 100000 (task.tokenizer's) (about "
                            "3.22e+06 parameters), expected at most 1e+06")


def test_the_size_cap_of_an_hf_model_counts_a_configured_tokenizer_s_vocabulary(tmp_path, monkeypatch):
    """An HF config is sized with the tokenizer's ids, not its own default vocabulary
    (qwen2's 151936: ~4.9e6 parameters here, above the lowered cap of 1e6)."""
    pytest.importorskip("transformers", reason="needs the 'hf' extra")
    monkeypatch.setattr(config, "MAX_PARAMS", 1_000_000)
    hf = {"config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "use_sliding_window": True,
                     "max_window_layers": 1, "sliding_window": 8, "tie_word_embeddings": True}}
    small = word_level_tokenizer(tmp_path / "small", 1_000)
    load_run_config({"task": {"name": "text", "tokenizer": small}, "model": {"hf": hf}})
    with pytest.raises(ConfigError) as e:
        load_run_config({"task": {"name": "text", "tokenizer": word_level_tokenizer(tmp_path / "big", 100_000)},
                         "model": {"hf": hf}})
    assert str(e.value).startswith("model.hf.config: got a qwen2 model of about 3.22e+06 parameters, expected at "
                                   "most 1e+06"), str(e.value)
