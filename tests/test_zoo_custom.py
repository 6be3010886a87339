"""model=custom: a factory from a file the test writes, its identity, and its checks
(src/nondet_hpc/model_factory.py, src/nondet_hpc/run/zoo/custom.py)."""

from __future__ import annotations

import random
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from nondet_hpc.config import ConfigError
from nondet_hpc.model_factory import factory_identity, factory_record, parse_factory
from nondet_hpc.run.zoo import bitflip_target, build_custom, check_output, default_bitflip_param

MODEL_FILE = '''
import random
import numpy as np
import torch
import torch.nn as nn

def make_net(width=8, classes=10, channels=1):
    torch.randn(3)  # draws from the global generators, as user code may
    np.random.rand(2)
    random.random()
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(classes) if width < 0 else nn.Linear(width * 64, classes))

def noisy_net(classes=10):
    """A module whose construction uses numpy's generator for its weights."""
    m = nn.Linear(64, classes)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.random.randn(classes, 64).astype("float32")))
    return m

def not_a_module():
    return 42

def no_params():
    return nn.ReLU()

def on_meta():
    return nn.Linear(2, 2, device="meta")

def broken(**kw):
    raise RuntimeError("bad width")

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A model file in a folder on sys.path, with a unique module name per test."""
    name = f"user_models_{abs(hash(str(tmp_path))) % 10**8}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, path
    sys.modules.pop(name, None)


def _g(seed=1):
    return torch.Generator().manual_seed(seed)


def _weights(m):
    return [t.clone() for t in m.state_dict().values()]


def test_custom_model_draws_from_the_init_stream_only(user_module):
    name, _ = user_module
    spec = f"{name}:make_net"
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a = _weights(build_custom(spec, {"width": 8}, _g(1)))
    after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    torch.manual_seed(77)
    b = _weights(build_custom(spec, {"width": 8}, _g(1)))
    c = _weights(build_custom(spec, {"width": 8}, _g(2)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # numpy's global generator inside the factory is seeded from the init stream too
    n1, n2, n3 = (build_custom(f"{name}:noisy_net", {}, _g(s)).weight for s in (1, 1, 2))
    assert torch.equal(n1, n2) and not torch.equal(n1, n3)


def test_custom_model_trains_and_checks_its_output(user_module):
    name, _ = user_module
    m = build_custom(f"{name}:make_net", {"width": 4, "classes": 3}, _g())
    check_output(m, (1, 8, 8), 3)
    with pytest.raises(ConfigError, match=r"returns \(2, 3\) for 2 images; it must return logits \[2, 10\]"):
        check_output(m, (1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"fails on images of shape \[B, 3, 8, 8\]"):
        check_output(m, (3, 8, 8), 3)
    assert m.training  # check_output restores the mode
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(m(torch.rand(4, 1, 8, 8)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert default_bitflip_param(m) == "0.weight"
    with pytest.raises(ConfigError, match=r"'conv1\.weight' does not exist in this model; its float32 parameters "
                                          r"are: 0\.weight, 0\.bias, 3\.weight, 3\.bias"):
        bitflip_target(m, "conv1.weight")


def test_identity_names_factory_kwargs_and_source_hash(user_module):
    name, path = user_module
    spec = f"{name}:make_net"
    ident = factory_identity(spec, {"width": 8, "classes": 10})
    assert ident["factory"] == spec and ident["kwargs"] == {"classes": 10, "width": 8}
    assert len(ident["source_sha256"]) == 64 and "source_file" not in ident
    assert factory_record(spec, {"width": 8})["source_file"] == str(path.resolve())
    assert factory_identity(spec, {"width": 9}) != factory_identity(spec, {"width": 8})
    path.write_text(path.read_text() + "\n# edited\n")
    edited = factory_identity(spec, {"width": 8, "classes": 10})
    assert edited["source_sha256"] != ident["source_sha256"]
    with pytest.raises(ConfigError, match="changed after this run's id was made"):
        build_custom(spec, {"width": 8}, _g(), expect_sha256=ident["source_sha256"])
    build_custom(spec, {"width": 8}, _g(), expect_sha256=edited["source_sha256"])


@pytest.mark.parametrize("spec,message", [
    ("no_colon_here", "is not 'package.module:function'"),
    ("bad-name:f", "is not 'package.module:function'"),
    ("surely_missing_module_xyz:f", "module 'surely_missing_module_xyz' was not found"),
    ("math:sqrt", "has no Python source file"),
])
def test_bad_factory_names_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        factory_identity(spec)


@pytest.mark.parametrize("attr,kwargs,message", [
    ("missing", {}, r"has no 'missing'; its public names: \[.*'make_net'"),
    ("NOT_CALLABLE", {}, "is a int, not a function or class"),
    ("not_a_module", {}, "returned a int, not a torch.nn.Module"),
    ("no_params", {}, "without parameters"),
    ("on_meta", {}, r"built tensors on \['meta'\]"),
    ("broken", {"width": 3}, "raised RuntimeError: bad width"),
])
def test_bad_factories_are_refused_with_one_message(user_module, attr, kwargs, message):
    name, _ = user_module
    with pytest.raises(ConfigError, match=message):
        build_custom(f"{name}:{attr}", kwargs, _g())


def test_kwargs_must_be_plain_values():
    assert parse_factory(" pkg.mod:Cls.create ") == ("pkg.mod", "Cls.create")
    from nondet_hpc.model_factory import canonical_kwargs
    assert canonical_kwargs(None) == {} and canonical_kwargs({"b": [1, 2], "a": {"x": None}}) == {"a": {"x": None},
                                                                                                   "b": [1, 2]}
    with pytest.raises(ConfigError, match="must be numbers, strings"):
        canonical_kwargs({"f": object()})
    with pytest.raises(ConfigError, match="must be a mapping"):
        canonical_kwargs([1, 2])
