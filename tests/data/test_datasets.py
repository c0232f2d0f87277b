"""The dataset registry: a dataset defined in this file works through load_splits, and data modules import no cycle."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import numpy as np
import pytest

from gesr_jax.data import batch as batch_lib
from gesr_jax.data import datasets
from gesr_jax.data.config import DataConfig

TOY_SCHEMA = batch_lib.BatchSchema(
    num_users=30, num_items=20, user_features=(), item_features=(("color", 4),), num_actions=2,
    history_len=3, num_candidates=4, tasks=("click",),
)  # fmt: skip


class ToyDataset:
    """Random requests with a single task, ``click``; its own item feature ``color``."""

    def schema(self, data_config: DataConfig) -> batch_lib.BatchSchema:
        return dataclasses.replace(TOY_SCHEMA, history_len=data_config.history_len)

    def load_splits(self, data_config: DataConfig) -> datasets.Splits:
        schema = self.schema(data_config)
        parts = [batch_lib.random_batch(schema, n, seed=data_config.seed + i) for i, n in enumerate((12, 5, 5))]
        return datasets.Splits(*parts, schema=schema, stats={"requests": 22})

    def item_table(self, data_config: DataConfig) -> dict[str, np.ndarray]:
        return {"color": np.arange(TOY_SCHEMA.num_items + 1, dtype=np.int32) % 4}


@pytest.fixture
def toy_source():
    datasets.register_dataset("toy_registry_test", ToyDataset())
    yield "toy_registry_test"
    datasets.unregister_dataset("toy_registry_test")


def test_a_dataset_registered_in_a_test_file_works_end_to_end(toy_source):
    config = DataConfig(source=toy_source, history_len=3, min_history=1)
    assert toy_source in datasets.sources()
    schema = datasets.schema_for(config)
    assert schema.tasks == ("click",) and schema.item_feature_names == ("color",)
    splits = datasets.load_splits(config)
    assert splits.schema == schema and splits.train["user_id"].shape == (12,)
    for name in ("train", "valid", "test"):
        batch_lib.validate_batch(getattr(splits, name), schema)
        assert "label_click" in getattr(splits, name) and "label_consume" not in getattr(splits, name)
    assert datasets.item_table(config)["color"].shape == (21,)


def test_registry_errors_are_clear(toy_source):
    with pytest.raises(datasets.DataError, match=r"data.source 'nope' is not a registered dataset.*toy_registry_test"):
        datasets.load_splits(DataConfig(source="nope"))
    with pytest.raises(ValueError, match="already registered"):
        datasets.register_dataset(toy_source, ToyDataset())
    datasets.register_dataset(toy_source, ToyDataset(), replace=True)
    with pytest.raises(TypeError, match=r"lacks the methods \['item_table'\]"):
        half = type("Half", (), {"schema": lambda s, c: None, "load_splits": lambda s, c: None})
        datasets.register_dataset("half", half())


def test_splits_whose_labels_disagree_with_the_schema_are_refused(toy_source, monkeypatch):
    dataset = datasets.get_dataset(toy_source)
    good = dataset.load_splits(DataConfig(source=toy_source, history_len=3, min_history=1))
    bad = dataclasses.replace(good, test={**good.test, "label_extra": good.test["label_click"]})
    monkeypatch.setattr(dataset, "load_splits", lambda config: bad)
    with pytest.raises(datasets.DataError, match=r"test split has labels \['label_click', 'label_extra'\]"):
        datasets.load_splits(DataConfig(source=toy_source, history_len=3, min_history=1))


def test_builtin_sources_register_on_lookup():
    assert datasets.schema_for(DataConfig()).tasks == ("consume", "engage")
    assert type(datasets.get_dataset("movielens")).__name__ == "MovieLensDataset"


def _imports(path: pathlib.Path) -> set[str]:
    """Every gesr_jax module ``path`` imports, at top level or inside functions (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from gesr_jax.data import synthetic`
    return {m for m in found if m.startswith("gesr_jax.")}


def test_data_modules_import_no_cycle():
    root = pathlib.Path(datasets.__file__).resolve().parents[2]
    modules = {
        ".".join(p.relative_to(root).with_suffix("").parts): p for p in (root / "gesr_jax" / "data").glob("*.py")
    }
    graph = {name: _imports(path) & set(modules) for name, path in modules.items()}
    # The registry reaches the built-in datasets only through importlib (by name, on lookup), never an import.
    assert graph["gesr_jax.data.datasets"] <= {"gesr_jax.data.batch", "gesr_jax.data.config"}
    assert "gesr_jax.data.datasets" in graph["gesr_jax.data.synthetic"]

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not cycles, f"modules on an import cycle: {cycles}"
