"""Property: whatever a spec file holds, the loader returns a spec or raises `ConfigError`.

Three generators: arbitrary text (YAML or not), random documents over the spec's own
keys, and the shipped specs with one value replaced at random. Any other exception —
TypeError, KeyError, a pydantic error leaking out — fails the property. Kept to a few
hundred examples so it runs in CI in seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metalearner.config import ConfigError
from metalearner.experiment import load_experiment

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "experiments").glob("*.yaml"))
KEYS = ["name", "description", "task", "model", "train", "controller", "search", "arms", "seeds", "resources",
        "metric", "mode", "stop", "smoke", "seed", "space", "searcher", "scheduler", "num_samples", "confirm",
        "steps", "seq_len", "batch_size", "factor", "beta", "threshold", "min_window", "preset", "d_model",
        "uniform", "loguniform", "choice", "grid", "randint", "controller.factor", "controller.beta", "distance",
        "n_pairs", "report_every", "checkpoint_every", "weight_decay", "cpus_per_trial", "time_budget_s", "x"]
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["recall", "text", "speech", "ewma", "static", "schedule", "plateau", "tiny", "small", "pbt",
                     "pb2", "asha", "optuna", "hyperopt", "random", "val_loss", "min", "max", "../../evil", ""]),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.integers(0, 3)), inner, max_size=5)),
    max_leaves=25,
)


def _load(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(content)
    try:
        spec = load_experiment(path)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg, msg
        return
    assert spec.arms and spec.seeds  # a spec that loads is a usable one
    for arm in spec.arms:
        assert arm.name and "/" not in arm.name
    assert all(math.isfinite(v) for v in (spec.time_budget_s, spec.resources.cpus_per_trial))


@FUZZ
@given(text=st.text(max_size=200))
def test_any_text(tmp_path, text):
    _load(tmp_path, text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(raw=st.binary(max_size=80))
def test_any_bytes(tmp_path, raw):
    _load(tmp_path, raw)


@FUZZ
@given(doc=documents)
def test_random_documents_over_the_spec_keys(tmp_path, doc):
    _load(tmp_path, yaml.safe_dump(doc, allow_unicode=True).encode())


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(data=st.data())
def test_shipped_specs_with_one_value_replaced(tmp_path, data):
    source = data.draw(st.sampled_from(SHIPPED), label="spec")
    doc = yaml.safe_load(source.read_text())
    paths = [p for p in _paths(doc) if p]
    where = data.draw(st.sampled_from(paths), label="path")
    node = doc
    for part in where[:-1]:
        node = node[part]
    node[where[-1]] = data.draw(documents, label="value")
    _load(tmp_path, yaml.safe_dump(doc, allow_unicode=True).encode())
