"""The kernels' own thread pool (llmc/plugins/csrc/parallel.h), in a subprocess that owns its threads: a kernel split
across the pool gives the one-thread result bit for bit, also from several Python threads at once and in a forked
child; the pool has a thread per torch thread but one, and they sleep once the kernels stop."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import llmc, json, multiprocessing, os, threading, time
import torch
from llmc.plugins.linear import prepack_weight
from llmc.plugins.quant_formats import quantize_fp8_weight
from llmc.plugins.quant_linear import prepack_quantized

ops = torch.ops.llmc
torch.manual_seed(0)
N, K = 1000, 256
x = torch.randn(3, K)
packed = prepack_weight(torch.randn(N, K))
q, scale = quantize_fp8_weight(torch.randn(N, K))
q = prepack_quantized(q)

def run():
    return [ops.prepacked_linear(x, packed, None, N), ops.fp8_prepacked_linear(x, q, scale, None, None, N)]

def same(results):
    return all(torch.equal(a, b) for a, b in zip(results, alone))

def workers():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return names.count("llmc-worker")

def states():  # the pool threads' scheduler states: R running (or spinning), S sleeping
    out = []
    for t in os.listdir("/proc/self/task"):
        if open(f"/proc/self/task/{t}/comm").read().strip() == "llmc-worker":
            out.append(open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()[0])
    return out

torch.set_num_threads(1)
alone = run()
before = workers()
torch.set_num_threads(4)
split = same(run())
after = workers()

results = []
def many():
    for _ in range(20):
        results.append(same(run()))
threads = [threading.Thread(target=many) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()

def child(queue):
    queue.put(same(run()))
queue = multiprocessing.get_context("fork").Queue()
proc = multiprocessing.get_context("fork").Process(target=child, args=(queue,))
proc.start()
proc.join(60)
forked = queue.get(timeout=1) if proc.exitcode == 0 else f"exit code {proc.exitcode}"

time.sleep(0.5)
print(json.dumps({"before": before, "split": split, "after": after, "concurrent": results, "forked": forked,
                  "idle": states()}))
"""


def test_kernels_on_the_pool_match_one_thread():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["before"] == 0 and out["after"] == 3  # started by the first split kernel: 4 torch threads, the caller one
    assert out["split"] is True
    assert out["concurrent"] == [True] * 80  # four Python threads calling kernels at once: one has the pool, the others run alone
    assert out["forked"] is True  # a forked child starts a pool of its own instead of waiting for its parent's threads
    assert out["idle"] == ["S"] * 3  # after the spin, they sleep
