"""The registry and derivations/ stay in step: every rule has its section,
every function or test a document names exists, and every link between the
documents reaches its file and heading."""

import importlib
import re

import pytest
from derivation_docs import DERIVATIONS, anchor, section

from jax_resnet import rules

DOCS = sorted(DERIVATIONS.glob("*.md"))
ROOT = DERIVATIONS.parent


@pytest.mark.parametrize("rule", list(rules.REGISTRY.values()), ids=list(rules.REGISTRY))
def test_every_rule_has_a_complete_section(rule):
    text = section(rule)
    for line in ("**Saves:**", "**Code:**", "**Checked by:**"):
        assert line in text, f"{rule.name}: section {rule.doc} lacks a {line} line"
    assert "$" in text, f"{rule.name}: section {rule.doc} has no math"


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_named_functions_exist(doc):
    names = set(re.findall(r"`(jax_resnet(?:\.\w+)+)`", doc.read_text()))
    for name in sorted(names):
        try:
            _resolve(name)
        except (AttributeError, ModuleNotFoundError) as err:
            pytest.fail(f"{doc.name} names `{name}`, which does not exist ({err})")


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_named_tests_exist(doc):
    for path, name in sorted(set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)", doc.read_text()))):
        source = ROOT / path
        assert source.exists(), f"{doc.name} names {path}, which does not exist"
        assert re.search(rf"^\s*def {name}\(", source.read_text(), re.M), (
            f"{doc.name} names {path}::{name}, which does not exist"
        )


def _anchors(path) -> set[str]:
    return {anchor(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", path.read_text(), re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_relative_links_and_anchors_resolve(doc):
    for target in sorted(set(re.findall(r"\]\(([^)\s]+)\)", doc.read_text()))):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.name} links to {target}, and {path} does not exist"
        if fragment:
            assert fragment in _anchors(linked), f"{doc.name} links to {target}: no such heading in {linked.name}"


def test_a_missing_function_is_caught():
    with pytest.raises(AttributeError):
        _resolve("jax_resnet.ops.activations._no_such_rule_bwd")
