"""One process of the two-process JAX test (launched by tests/test_multiprocess_jax.py).

Usage: python _jax_worker.py PORT PROCESS_ID NUM_PROCESSES DATA.npz OUT.json

Joins a `jax.distributed` job on 127.0.0.1:PORT with gloo CPU collectives, builds global
arrays over every device of every process (the parent sets 2 host devices per process), and
runs a linear model + `focal_jax.softmax_focal(..., reduction="mean_positive", axis_name="d")`
under `shard_map`, with the data-parallel recipe: average the per-shard loss with `lax.pmean`
and differentiate that; and the same loss without `axis_name` under plain `jit` of the globally
sharded arrays. Writes the values and the gradients (w.r.t. the weights, the bias and, for
shard_map, the logits; gathered from all processes) to OUT.json; the parent compares them with
a float64 NumPy reference on the whole batch.
"""

import json
import os
import sys

# Run as a script, Python puts tests/ first on sys.path, and tests/focal_jax/ (the unit tests'
# folder) would shadow the installed package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
  sys.path.pop(0)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
# gloo is jax 0.10's default for CPU collectives; set it anyway so the test states what it uses.
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(argv: list[str]) -> None:
  port, process_id, num_processes = argv[1], int(argv[2]), int(argv[3])
  data_path, out_path = argv[4], argv[5]
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
      process_id=process_id, initialization_timeout=60)

  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import focal_jax

  data = np.load(data_path)
  mesh = Mesh(np.array(jax.devices()), ("d",))

  def put(x: np.ndarray, spec: P) -> jax.Array:
    # Every process holds the whole batch; each device takes its slice.
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

  def step(w, b, x, y, alpha):
    def loss_fn(w, b):
      z = x @ w + b
      local = focal_jax.softmax_focal(
          z, y, alpha=alpha, gamma=2.0, ignore_index=-1, reduction="mean_positive",
          background_class=0, axis_name="d")
      return jax.lax.pmean(local, "d")

    def loss_of_logits(z):
      local = focal_jax.softmax_focal(
          z, y, alpha=alpha, gamma=2.0, ignore_index=-1, reduction="mean_positive",
          background_class=0, axis_name="d")
      return jax.lax.pmean(local, "d")

    value, (gw, gb) = jax.value_and_grad(loss_fn, argnums=(0, 1))(w, b)
    gz = jax.grad(loss_of_logits)(x @ w + b)
    return value, gw, gb, gz

  sharded = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P("d"), P("d"), P()),
      out_specs=(P(), P(), P(), P("d"))))

  def global_loss(w, b, x, y, alpha):
    # No axis_name: jit over globally sharded arrays; XLA inserts the cross-process reductions.
    return focal_jax.softmax_focal(
        x @ w + b, y, alpha=alpha, gamma=2.0, ignore_index=-1, reduction="mean_positive",
        background_class=0)

  sharded_jit = jax.jit(jax.value_and_grad(global_loss, argnums=(0, 1)))

  results = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
  }
  for dtype in ("float64", "float32"):
    args = [data["w"], data["b"], data["x"], data["y"], data["alpha"]]
    args = [a.astype(dtype) if a.dtype.kind == "f" else a for a in args]
    specs = [P(), P(), P("d"), P("d"), P()]
    global_args = [put(a, s) for a, s in zip(args, specs)]
    outs = sharded(*global_args)
    value, gw, gb, gz = (
        np.asarray(multihost_utils.process_allgather(o, tiled=True)) for o in outs)
    jit_value, (jit_gw, jit_gb) = sharded_jit(*global_args)
    jit_value, jit_gw, jit_gb = (
        np.asarray(multihost_utils.process_allgather(o, tiled=True))
        for o in (jit_value, jit_gw, jit_gb))
    results[dtype] = {
        "dtype": str(value.dtype), "value": value.tolist(), "grad_w": gw.tolist(),
        "grad_b": gb.tolist(), "grad_logits": gz.tolist(),
        "jit_dtype": str(jit_value.dtype), "jit_value": jit_value.tolist(),
        "jit_grad_w": jit_gw.tolist(), "jit_grad_b": jit_gb.tolist()}

  with open(out_path, "w") as f:
    json.dump(results, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
