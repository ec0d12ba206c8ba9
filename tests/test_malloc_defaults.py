"""jaxmed's glibc malloc settings (jaxmed._malloc): set at import, switched off by the user."""

import ctypes
import resource

import pytest

from jaxmed import _malloc


class FakeLibc:
  """Records ``mallopt`` calls; returns ``result`` (glibc: 1 accepted, 0 refused)."""

  def __init__(self, result=1):
    self.calls, self.result = [], result

  def mallopt(self, param, value):
    self.calls.append((param, value))
    return self.result


@pytest.mark.parametrize("environ, applied", [
    ({}, True), ({"JAXMED_MALLOC_DEFAULTS": "on"}, True), ({"JAXMED_MALLOC_DEFAULTS": "ON"}, True),
    ({"JAXMED_MALLOC_DEFAULTS": "off"}, False), ({"JAXMED_MALLOC_DEFAULTS": "Off"}, False),
])
def test_settings_are_set_unless_switched_off(environ, applied):
  libc = FakeLibc()
  assert _malloc.apply_malloc_defaults(environ, libc=libc) is applied
  assert libc.calls == ([(-4, 0), (-1, 1 << 30)] if applied else [])


def test_a_refused_setting_is_reported():
  assert _malloc.apply_malloc_defaults({}, libc=FakeLibc(result=0)) is False


def test_bad_setting_is_named():
  with pytest.raises(ValueError, match="JAXMED_MALLOC_DEFAULTS must be 'on' or 'off'; got 'no'"):
    _malloc.apply_malloc_defaults({"JAXMED_MALLOC_DEFAULTS": "no"}, libc=FakeLibc())


def _page_faults_of_a_fresh_buffer(libc, nbytes):
  """Minor page faults of malloc, write every byte, free (C's, as XLA allocates: NumPy asks
  for huge pages on large arrays, which would hide the 4 KiB faults)."""
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ptr = libc.malloc(nbytes)
  assert ptr, f"malloc({nbytes}) failed"
  ctypes.memset(ptr, 1, nbytes)
  libc.free(ptr)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(_malloc.glibc() is None, reason="the settings exist only in glibc")
def test_the_test_process_reuses_freed_large_buffers():
  # jaxmed was imported with the defaults on: a 48 MiB buffer (above glibc's largest mmap
  # threshold, 32 MiB) is served from the heap, so allocating it again after freeing it reuses
  # the pages already mapped; with glibc's defaults every allocation would map 12,288 new pages.
  libc, nbytes = _malloc.glibc(), 48 << 20
  _page_faults_of_a_fresh_buffer(libc, nbytes)
  assert _page_faults_of_a_fresh_buffer(libc, nbytes) < (nbytes >> 12) // 4
