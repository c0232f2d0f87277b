"""The MoA component table: which modules GESR can run, their output widths, stage and route.

One row per component. ``stage`` says where its work happens: "ro" components run entirely in
``encode_request`` (once per request; outputs [B, 1, w], broadcast to candidates), "nro" components cache
request-only work in ``encode_request`` and finish per candidate chunk in ``score`` (outputs [B, C, w]).
``route`` says where the outputs go (spec §1.9, read off the paper's figure; UNCONFIRMED): "main" joins the
two-tower interaction (the main logit), "mlpg" feeds the MLPG branches (or the main interaction when
``model.mlpg.enabled=false``). A component's initial values and dropout stream come from its name (``moa/<name>``, layers/core.named_rngs),
so the unique name is all a row needs: adding or removing a component never changes another one's values.

The module of a row is named as "module:Class" and imported only when a model is built, so this table (and
the config validation that reads it) needs no JAX. A module implements the protocol in ``moa.py``
(``from_config``, ``encode_request``, ``score_candidates``). Adding a MoA module: write its file, add one row here (or call
:func:`register_component` from your own code) and switch it on with ``model.extra_moa=name`` or a
config field of its own.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

STAGES = ("ro", "nro")
ROUTES = ("main", "mlpg")
UNIFIED_ITEM = "unified_item"  # the token embedder's main-path output ("Unified Learned Item Embeddings")
# Default MLPG inputs in the spec's listing order (§1.9); the order fixes MLPG's parameter layout.
MLPG_DEFAULT_ORDER = ("hstu", "nro_cross", "ro_summary", "ro_profile")


@dataclasses.dataclass(frozen=True)
class Component:
    name: str  # attribute of the GESR model; key of its cache in the RequestState
    module: str | type  # "module:Class" (or the class): an nnx.Module with from_config / encode_request / score_candidates
    stage: str  # "ro" or "nro" (see the module docstring)
    route: str  # "main" or "mlpg"
    outputs: Callable[[Any], dict[str, int]]  # config -> {output name: width}
    enabled: Callable[[Any], bool] | None = None  # config -> on?; None = on when name is in model.extra_moa

    def is_enabled(self, config: Any) -> bool:
        return self.enabled(config) if self.enabled is not None else self.name in config.extra_moa

    def module_class(self) -> type:
        if isinstance(self.module, str):  # named: module classes import JAX, this table is read by config checks
            path, _, attr = self.module.partition(":")
            return getattr(importlib.import_module(path), attr)
        return self.module


_MOA = "gesr_jax.models.gesr.moa"

MOA_COMPONENTS: list[Component] = [
    Component("hma", f"{_MOA}:HMAComponent", "nro", "main",
              lambda c: {"hma": c.hma.mlp[-1]}, lambda c: c.hma.enabled),
    Component("hstu", f"{_MOA}:HSTUComponent", "nro", "mlpg",
              lambda c: {"hstu": c.embed_dim}, lambda c: c.hstu.enabled),
    Component("ro_cross", f"{_MOA}:ROCrossComponent", "ro", "mlpg",
              lambda c: {"ro_summary": c.cross.num_seeds * c.embed_dim,
                         **({"ro_profile": c.embed_dim} if c.cross.profile_query else {})},
              lambda c: c.cross.ro),
    Component("nro_cross", f"{_MOA}:NROCrossComponent", "nro", "mlpg",
              lambda c: {"nro_cross": c.embed_dim}, lambda c: c.cross.nro),
]  # fmt: skip


def register_component(component: Component) -> None:
    """Add a user component to the table (switched on by ``model.extra_moa``)."""
    if component.stage not in STAGES or component.route not in ROUTES:
        raise ValueError(f"component {component.name!r}: stage must be in {STAGES} and route in {ROUTES}")
    if any(c.name == component.name for c in MOA_COMPONENTS):
        raise ValueError(f"a MoA component named {component.name!r} is already registered")
    MOA_COMPONENTS.append(component)


def enabled(config: Any, route: str | None = None) -> list[Component]:
    """Enabled components in table order, optionally only those of one route."""
    return [c for c in MOA_COMPONENTS if c.is_enabled(config) and (route is None or c.route == route)]


def enabled_outputs(config: Any) -> list[tuple[str, int]]:
    """(name, width) of every MoA output that exists under ``config``: main route, unified item, MLPG route."""
    out = [item for c in enabled(config, "main") for item in c.outputs(config).items()]
    if config.uses_tokens:
        out.append((UNIFIED_ITEM, config.embed_dim))
    out += [item for c in enabled(config, "mlpg") for item in c.outputs(config).items()]
    return out


def mlpg_route_outputs(config: Any) -> tuple[str, ...]:
    """Names of the MLPG-routed outputs that are on: the default inputs of an MLPG branch."""
    names = [n for c in enabled(config, "mlpg") for n in c.outputs(config)]
    ordered = [n for n in MLPG_DEFAULT_ORDER if n in names]
    return tuple(ordered + [n for n in names if n not in ordered])


def all_output_names(config: Any) -> tuple[str, ...]:
    """Every output name a component of the table produces under ``config``, on or off (for validation)."""
    names = [n for c in MOA_COMPONENTS for n in c.outputs(config)]
    return tuple(dict.fromkeys([*names, UNIFIED_ITEM]))
