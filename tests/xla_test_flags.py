"""The XLA flags every test process runs with (this module imports nothing: `conftest` reads it
before JAX or jaxmed is imported, and the multi-process tests pass it to their workers).

The suite's tiny programs spend far longer compiling than running. LLVM's -O0 for XLA:CPU cut
the CPU time of the Swin-UNETR and SimSiam method tests by 22-28%; XLA's older element-wise
emitters instead of its fusion emitters halved the compile time of a tiny Swin-UNETR train step
(10.4 -> 5.8 s; the step ran 1.27 -> 1.58 s). One LLVM module per program instead of XLA's split
into parts for parallel codegen: the split alone took ~0.5 s per tiny Swin-UNETR step, and with
two test workers on two cores the parallel codegen gains nothing (CPU time of that step's
compile 3.65 -> 3.04 s, of its initialisation 4.1 -> 3.7 s).
"""


def xla_flags(devices: int) -> str:
  """``XLA_FLAGS`` for a test process with ``devices`` simulated CPU devices."""
  return (f"--xla_force_host_platform_device_count={devices} "
          "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
          "--xla_cpu_parallel_codegen_split_count=1")
