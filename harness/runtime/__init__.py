"""Code that runs inside a stage process: in the sandbox the runner chose, beside the
submission's code.

Everything a stage process imports lives here: the pre-flight (orchestrator, worker, checks
and the low-bit capture engine), the pretrain stage's launcher and guard, run-time integrity
and the low-bit audit, loading a spliced script, the lm-eval model and runner with the eval-set
and eval.json formats, the offline tokenizer, the image probe, the region-marker parser, the
one atomic writer and file hasher (`fileio`) and the one process-tree helper (`procs`).

The rule, checked by tests/test_import_graph.py: a module of harness.runtime imports only
the standard library, third-party packages, other harness.runtime modules, `harness` (the
package, for __version__) and `harness.errors` (exception types, no imports of its own).
Host code may import from here; nothing here imports host code, so what runs in a container
depends on nothing that only the host side has.
"""
