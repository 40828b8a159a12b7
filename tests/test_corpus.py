"""Your corpus: the text task reads jsonl, parquet and text files through HF datasets, with
a local tokenizer, logs the corpus's fingerprint, and refuses bad input before anything starts.

Every corpus and the tokenizer are built here, in the test's folder: a WordLevel tokenizer
trained in-process with `tokenizers` and saved with ``save_pretrained`` (no download).
"""

from __future__ import annotations

import json
import socket
import sys

import pytest

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from metalearner.cli import main  # noqa: E402
from metalearner.tasks.text import TextConfig, TextTask  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron".split()
DOCS = [f"record {i} says {' '.join(WORDS[(i + k) % len(WORDS)] for k in range(6))} ." for i in range(120)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same records as jsonl, parquet and text files, and a tokenizer folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("corpus")
    (d / "c.jsonl").write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(DOCS)))
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "body": DOCS}), d / "c.parquet")
    for i in range(3):
        (d / f"part{i}.txt").write_text("\n".join(DOCS[i::3]) + "\n")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(d / "tok")
    return d


def task(**cfg):
    return TextTask(TextConfig(**cfg), batch_size=4, seq_len=16, seed=0)


def test_batches_come_from_the_corpus_in_every_format(corpus):
    """Decoded, every window is a piece of the corpus's documents in order: bytes of the
    documents joined by a blank line, or tokens with an end-of-sequence after each document."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(corpus / "tok"), local_files_only=True)
    files = [corpus / f"part{i}.txt" for i in range(3)]
    readings = {"jsonl": (dict(files=[str(corpus / "c.jsonl")], text_field="body"), DOCS),
                "parquet": (dict(files=[str(corpus / "c.parquet")], text_field="body"), DOCS),
                "text": (dict(files=list(map(str, files)), format="text"), [f.read_text() for f in files])}
    for reading, (cfg, docs) in readings.items():
        byte_task = task(**cfg)
        assert byte_task.params()["reading"] == reading and byte_task.vocab_size == 256
        for step in (1, 2):
            window = bytes(byte_task.train_batch(step)["tokens"][0].tolist()).decode("utf-8")
            assert window in "\n\n".join(docs), (reading, window)
        t = task(tokenizer=str(corpus / "tok"), **cfg)
        stream = " ".join(" ".join(doc.split()) + " [EOS]" for doc in docs)
        for step in (1, 2, 3):
            b = t.train_batch(step)
            assert b["tokens"].max() < t.vocab_size == len(tok) and b["tokens"].min() >= 0
            assert (b["tokens"][:, 1:] == b["targets"][:, :-1]).all()
            for row in b["tokens"]:
                window = tok.decode(row.tolist())
                assert window in stream and "[UNK]" not in window, (reading, window)
        assert t.model_overrides()["vocab_size"] == t.vocab_size


def test_the_model_s_vocabulary_follows_the_tokenizer(corpus):
    from metalearner.config import load_run_config
    from metalearner.train import TrainingRun

    cfg = load_run_config({"task": {"name": "text", "files": [str(corpus / "c.jsonl")], "text_field": "body",
                                    "tokenizer": str(corpus / "tok")},
                           "model": {"preset": "tiny"}, "train": {"seq_len": 16, "batch_size": 2, "steps": 2}})
    run = TrainingRun(cfg)
    assert run.model_config.vocab_size == run.task.vocab_size
    assert run.model_config.vocab_size != 256
    logits = run.model(run.task.train_batch(1)["tokens"])
    assert logits.shape[-1] == run.task.vocab_size
    assert run.params()["model.vocab_size"] == run.params()["task.vocab_size"] == run.task.vocab_size


def test_the_tokenizer_s_vocabulary_is_read_from_its_files_as_len_tokenizer(corpus, tmp_path):
    """`tokenizer_vocab_size` (the config's size check) counts what ``len(tokenizer)`` counts,
    without loading it: the model's pieces and the added tokens (one already a piece, one
    new, one special), for a WordLevel and a Unigram model; None where it cannot tell."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from metalearner.tasks.corpus import tokenizer_vocab_size

    def loaded(folder):
        return len(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))

    grown = AutoTokenizer.from_pretrained(str(corpus / "tok"), local_files_only=True)
    grown.add_tokens(["alpha", "brand_new"])
    grown.add_special_tokens({"additional_special_tokens": ["<x>"]})
    grown.save_pretrained(tmp_path / "grown")
    unigram = Tokenizer(models.Unigram([("[UNK]", 0.0), *((w, -1.0 - i) for i, w in enumerate(WORDS))], unk_id=0))
    PreTrainedTokenizerFast(tokenizer_object=unigram, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(
        tmp_path / "unigram")
    for folder in (corpus / "tok", tmp_path / "grown", tmp_path / "unigram"):
        assert tokenizer_vocab_size(str(folder)) == loaded(folder), folder
    assert tokenizer_vocab_size(str(tmp_path / "grown")) == tokenizer_vocab_size(str(corpus / "tok")) + 2
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text('{"model": {}}')
    for folder in ("slow", "broken", "absent"):
        assert tokenizer_vocab_size(str(tmp_path / folder)) is None, folder


def test_the_fingerprint_is_stable_and_follows_the_content(corpus, tmp_path):
    jsonl = dict(files=[str(corpus / "c.jsonl")], text_field="body")
    first = task(**jsonl).params()["fingerprint"]
    assert task(**jsonl).params()["fingerprint"] == first
    assert task(files=[str(corpus / "c.parquet")], text_field="body").params()["fingerprint"] == first  # same records
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes((corpus / "c.jsonl").read_bytes())
    assert task(files=[str(copy)], text_field="body").params()["fingerprint"] == first  # content, not name or time
    lines = copy.read_text().splitlines()
    lines[7] = json.dumps({"id": 7, "body": DOCS[7].replace("record", "Record")})
    copy.write_text("\n".join(lines) + "\n")
    assert task(files=[str(copy)], text_field="body").params()["fingerprint"] != first


def test_nothing_reaches_the_network(corpus, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the network was reached")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    t = task(files=[str(corpus / "c.parquet")], text_field="body", tokenizer=str(corpus / "tok"))
    assert t.params()["train_tokens"] > 0


def test_plain_files_read_as_before(tmp_path):
    import hashlib

    raw = "caf\xe9 \u00fcber text\r\n".encode("latin-1") * 40  # not UTF-8, CRLF: bytes as they are
    (tmp_path / "a.txt").write_bytes(raw)
    t = task(files=[str(tmp_path / "a.txt")])
    assert t.params()["reading"] == "bytes" and t.params()["fingerprint"] == hashlib.sha256(raw).hexdigest()
    assert bytes(t.train_data.tolist()) + bytes(t.val_data.tolist()) == raw


def test_plain_files_with_a_tokenizer_are_one_document_each(corpus, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(corpus / "tok"), local_files_only=True)
    files = [str(corpus / f"part{i}.txt") for i in range(3)]
    t = task(files=files, tokenizer=str(corpus / "tok"))
    stream = " ".join(" ".join(open(f).read().split()) + " [EOS]" for f in files)
    assert t.params()["reading"] == "bytes" and tok.decode(t.train_batch(1)["tokens"][0].tolist()) in stream
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 200)
    with pytest.raises(ValueError, match=r"^task\.files: got '.*latin\.txt', not UTF-8"):
        task(files=[str(tmp_path / "latin.txt")], tokenizer=str(corpus / "tok"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def bad_inputs(corpus, workdir):
    (workdir / "notatok").mkdir()
    (workdir / "notatok" / "config.json").write_text("{}")
    (workdir / "brokentok").mkdir()
    (workdir / "brokentok" / "tokenizer_config.json").write_text("{not json")
    jsonl = [f"task.files={corpus / 'c.jsonl'}"]
    return [
        (["task.files=/no/such/corpus.jsonl"], "task.files: got '/no/such/corpus.jsonl'"),
        ([*jsonl, "task.format=csv"], "task.format: got 'csv'"),
        ([*jsonl, "task.text_field=content"], "task.text_field: got 'content'"),
        ([f"task.files={corpus / 'c.parquet'}", "task.text_field=content"], "task.text_field: got 'content'"),
        ([*jsonl, "task.text_field=body", f"task.tokenizer={workdir / 'notatok'}"], "task.tokenizer: got"),
        ([*jsonl, "task.text_field=body", f"task.tokenizer={workdir / 'brokentok'}"], "task.tokenizer: got"),
        ([*jsonl, "task.text_field=body", "task.tokenizer=/no/such/folder"], "task.tokenizer: got '/no/such/folder'"),
        ([f"task.files={corpus / 'c.jsonl'},{corpus / 'part0.txt'}"], "task.format: got 'auto'"),
    ]


def test_bad_input_exits_2_with_one_line_naming_the_field(corpus, workdir, capsys):
    for sets, field in bad_inputs(corpus, workdir):
        before = sorted(p.name for p in workdir.iterdir())
        argv = ["train", "--task", "text", "--steps", "2", "--set", "model.preset=tiny", "--set", "train.seq_len=16"]
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, *(a for s in sets for a in ("--set", s))])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and field in err[0], (sets, err)
        assert sorted(p.name for p in workdir.iterdir()) == before  # no mlflow.db
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_a_sweep_refuses_a_bad_corpus_before_ray_starts(corpus, workdir, capsys):
    import yaml

    (workdir / "brokentok").mkdir()
    (workdir / "brokentok" / "tokenizer.json").write_text("{}")
    base = {"name": "probe", "model": {"preset": "tiny"}, "train": {"steps": 2, "seq_len": 16}, "seeds": [0],
            "arms": [{"name": "static", "controller": {"name": "static"}}]}
    jsonl = {"name": "text", "files": [str(corpus / "c.jsonl")]}
    for task_section, field in (({**jsonl, "text_field": "content"}, "task.text_field: got 'content'"),
                                ({**jsonl, "text_field": "body", "tokenizer": "brokentok"}, "task.tokenizer: got")):
        (workdir / "spec.yaml").write_text(yaml.safe_dump({**base, "task": task_section}))
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", "spec.yaml", "--num-cpus", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and field in err[0], err
        assert sorted(p.name for p in workdir.iterdir()) == ["brokentok", "spec.yaml"]  # no ray_results, no mlflow.db
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_train_on_a_jsonl_corpus_with_a_tokenizer_logs_the_fingerprint(corpus, cli, tmp_path, sqlite_uri):
    import mlflow

    res = cli("train", "--task", "text", "--controller", "ewma", "--steps", "6", "--tracking-uri", sqlite_uri,
              "--set", f"task.files={corpus / 'c.jsonl'}", "--set", "task.text_field=body",
              "--set", f"task.tokenizer={corpus / 'tok'}", "--set", "model.preset=tiny",
              "--set", "train.seq_len=16", "--set", "train.batch_size=2", "--set", "train.eval_every=3",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = task(files=[str(corpus / "c.jsonl")], text_field="body", tokenizer=str(corpus / "tok"))
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    params = run.data.params
    assert params["task.fingerprint"] == expected.params()["fingerprint"]
    assert params["task.tokenizer"] == str(corpus / "tok") and params["task.reading"] == "jsonl"
    assert int(params["model.vocab_size"]) == expected.vocab_size
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 6 and all(v == v for v in losses)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [3, 6]


def test_a_missing_datasets_or_transformers_names_the_extra(corpus, monkeypatch):
    import importlib.util

    from metalearner.config import load_run_config, missing_extras

    cfg = load_run_config({"task": {"name": "text", "files": [str(corpus / "c.parquet")], "text_field": "body",
                                    "tokenizer": str(corpus / "tok")}})
    assert missing_extras(cfg) is None
    find_spec = importlib.util.find_spec
    for gone, field in (("datasets", "task.format: got 'parquet'"), ("transformers", "task.tokenizer: got")):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, gone=gone: None if name == gone
                            else find_spec(name, *a))
        err = str(missing_extras(cfg))
        assert err.startswith(field) and "pip install 'metalearner[hf]'" in err, err
    assert missing_extras(load_run_config({"task": {"name": "text"}})) is None  # the default needs neither
