"""The machinery of the input-domain audits (tests/*/test_input_domains.py, issue 18).

An audit table maps each public name of a package to a `Spec`: one valid call (``arrays``,
traced under `jax.jit`, and ``static`` keyword arguments; ``after`` turns an output that is not an
array, e.g. a returned function, into arrays inside the jitted call) and its bad-input `Case`s
(or a `NO_DOMAIN` string giving the reason there are none). `audit_tests` makes the tests.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable

import jax
import numpy as np
import pytest

NO_DOMAIN = "no domain beyond shapes: "


@dataclasses.dataclass(frozen=True)
class Case:
  what: str                  # what is out of the domain
  override: dict             # keyword arguments that replace the valid ones
  arg: str                   # the argument the error must name
  error: type = ValueError   # TypeError where a wrong dtype is a type error (DESIGN.md)


@dataclasses.dataclass(frozen=True)
class Spec:
  arrays: dict
  static: dict = dataclasses.field(default_factory=dict)
  cases: Any = ()            # a list of Case, or a NO_DOMAIN string with the reason
  after: Callable | None = None


def public_callables(package) -> set[str]:
  """The public callables of ``package``: its ``__all__`` and any other non-module public name."""
  names = set(package.__all__)
  names |= {n for n in dir(package) if not n.startswith("_") and not inspect.ismodule(
      getattr(package, n)) and callable(getattr(package, n))}
  return names


def assert_audited(package, audit: dict) -> None:
  public = public_callables(package)
  missing, stale = sorted(public - set(audit)), sorted(set(audit) - public)
  assert not missing, (f"public functions of {package.__name__} without an entry in the audit "
                       f"table: {missing}; list their bad-input cases (or '{NO_DOMAIN}<reason>')")
  assert not stale, f"audit entries for names {package.__name__} does not export: {stale}"
  for name, cases in audit.items():
    ok = (isinstance(cases, str) and cases.startswith(NO_DOMAIN) and len(cases) > len(NO_DOMAIN)
          ) or (isinstance(cases, list) and cases and all(isinstance(c, Case) for c in cases))
    assert ok, f"{name}: the entry must be a non-empty list of Case or '{NO_DOMAIN}<reason>'"


def assert_rejects(fn, spec: Spec, case: Case) -> None:
  """``fn`` with ``case.override`` raises ``case.error`` naming ``case.arg`` as a word."""
  kwargs = {**spec.arrays, **spec.static, **case.override}
  with pytest.raises(case.error, match=rf"(?<!\w){re.escape(case.arg)}(?!\w)"):
    fn(**kwargs)


def run_under_jit(fn, spec: Spec, *, concrete: bool = True) -> None:
  """``fn``'s valid call with ``spec.arrays`` traced by `jax.jit` runs (value checks skip
  tracers; checks of static arguments run while tracing).

  With ``concrete`` it must also equal the call on the concrete arrays, where the value checks
  of array arguments run and pass. That call runs inside a `jax.jit` too, with the arrays closed
  over (constants, not tracers): one compilation instead of an eager op-by-op run.
  """
  after = spec.after or (lambda out: out)
  call = lambda arrays: after(fn(**arrays, **spec.static))
  traced = jax.jit(call)(spec.arrays)
  assert jax.tree_util.tree_leaves(traced), f"{fn.__name__} returned no array"
  if not concrete:
    return
  checked = jax.jit(lambda: call(spec.arrays))()
  assert jax.tree_util.tree_structure(traced) == jax.tree_util.tree_structure(checked)
  for t, c in zip(jax.tree_util.tree_leaves(traced), jax.tree_util.tree_leaves(checked)):
    np.testing.assert_allclose(np.asarray(t), np.asarray(c), rtol=1e-5, atol=1e-6)


def audit_tests(package, audit: dict, concrete=lambda name: True):
  """The three tests of an audit table ``{name: Spec}`` of ``package``, to assign at module level:
  every public callable audited; every case a ValueError (or its ``error``) naming its argument;
  every valid call running under `jax.jit` (``concrete(name)``: see `run_under_jit`)."""
  pairs = [(n, c) for n, s in audit.items() if not isinstance(s.cases, str) for c in s.cases]

  def test_every_public_function_is_audited():
    assert_audited(package, {name: spec.cases for name, spec in audit.items()})

  @pytest.mark.parametrize("name,case", pairs, ids=[f"{n}-{c.what}" for n, c in pairs])
  def test_out_of_domain_input_is_rejected(name, case):
    assert_rejects(getattr(package, name), audit[name], case)

  @pytest.mark.parametrize("name", sorted(audit))
  def test_valid_input_runs_under_jit(name):
    run_under_jit(getattr(package, name), audit[name], concrete=concrete(name))

  return (test_every_public_function_is_audited, test_out_of_domain_input_is_rejected,
          test_valid_input_runs_under_jit)
