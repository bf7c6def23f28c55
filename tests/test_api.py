"""The public API is visible and declared: explicit names, `__all__` lists that resolve, the spec
protocol implemented by every family, and lists derived from their one source."""

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import jax_resnet
from jax_resnet import models, ops

# The op family modules declare their surface as `OPS` (the names ops/__init__.py builds everything from).
PUBLIC_MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(jax_resnet.__path__, "jax_resnet.")
    if not any(part.startswith("_") for part in m.name.split("."))
    and not m.name.startswith(("jax_resnet.commands", "jax_resnet.ops."))
    and m.name != "jax_resnet.cli"
)


def test_ops_lists_are_the_specs():
    """The flat names, `__all__` and the `OpSet` fields are written out for editors; they equal `SPECS`."""
    assert ops.OpSet._fields == tuple(ops.SPECS)
    flat = [name for name in ops.__all__ if name in ops.SPECS]
    assert flat == list(ops.SPECS), "ops.__all__ lists the ops in SPECS order"
    for name, spec in ops.SPECS.items():
        assert getattr(ops, name) is spec.fn is getattr(ops.RULES, name)
        assert getattr(ops.AUTODIFF, name) is spec.reference
    families = [m.__name__.rsplit(".", 1)[1] for m in ops.FAMILIES]
    assert sorted(n for n in ops.__all__ if n in families) == sorted(families)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_public_module_declares_all_and_each_name_exists(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing}, which it does not define"
    assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ repeats a name"


def test_the_package_exposes_its_modules_and_imports_the_heavy_ones_on_use():
    top = {name.split(".")[1] for name in PUBLIC_MODULES if name.count(".") == 1}
    assert top <= set(jax_resnet.__all__), f"not exposed by jax_resnet: {sorted(top - set(jax_resnet.__all__))}"
    code = (
        "import sys, jax_resnet\n"
        "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'optax', 'orbax', 'matplotlib'})\n"
        "print(heavy()); jax_resnet.nnx.Network; print(heavy())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    before, after = out.stdout.splitlines()
    assert before == "[]", "import jax_resnet alone loads " + before
    assert "flax" in after, "jax_resnet.nnx is the nnx module"


def _signature(fn):
    """Parameter names, kinds and whether each has a default, less `self`."""
    return [(p.name, p.kind, p.default is p.empty) for p in inspect.signature(fn).parameters.values()][1:]


CONTRACT = [name for name, member in inspect.getmembers(models.Spec) if inspect.isfunction(member)]
CONTRACT = [name for name in CONTRACT if not name.startswith("_")]


def test_the_protocol_names_the_documented_contract():
    assert sorted(CONTRACT) == sorted(
        ["init", "forward", "hook_points", "weight_paths", "describe", "input_shape", "for_data"]
    )


@pytest.mark.parametrize("family", models.FAMILIES, ids=[f.__name__ for f in models.FAMILIES])
def test_every_family_implements_the_spec_protocol(family):
    for name in CONTRACT:
        assert _signature(getattr(family, name)) == _signature(getattr(models.Spec, name)), (
            f"{family.__name__}.{name}{inspect.signature(getattr(family, name))} does not have the signature of "
            f"models.Spec.{name}{inspect.signature(getattr(models.Spec, name))}"
        )


@pytest.mark.parametrize("preset", sorted(models.PRESETS))
def test_every_preset_is_built_on_a_family(preset):
    spec = models.PRESETS[preset]().spec
    assert isinstance(spec, models.Spec)
    assert type(spec) in models.FAMILIES, f"{preset}: {type(spec).__name__} is not in models.FAMILIES"


def test_an_object_without_the_contract_is_not_a_spec():
    class Partial:
        def init(self, key, dtype):
            return {}, {}

    assert not isinstance(Partial(), models.Spec)


def test_models_all_lists_every_preset():
    missing = sorted(set(models.PRESETS) - set(models.__all__))
    assert not missing, f"models.__all__ lacks the presets {missing}"
