"""Tools the tests and benchmarks use, never imported by the product package `pipeline`.

- `testkit.chaos`: an HTTP proxy in front of S3 that injects faults (throttling, 500s,
  AccessDenied, dropped connections, delays) on a deterministic schedule;
- `testkit.faults`: kill a Ray worker mid-stage, seed a store with finished stages, audit a
  store, and the fine-tune crash hook (`pipeline.hooks`);
- `testkit.localcluster`: a real multi-node Ray cluster on one machine (`ray start` per node);
- `testkit.models`: a tiny random Llama, its tokenizer and a small corpus, built offline;
- `testkit.synthetic`: a synthetic (w, h) weight stream and a loader of it for the sharded
  quantizers.

`pipeline` must not import anything here (tests/test_layout.py checks): the product runs
without this package, and the image in deploy/ does not hold it.
"""
