"""A learner process for the SIGKILL test: resumes from its checkpoint, saves after every batch.

Before each save it appends ``position digest`` to the intent log (fsync'ed), so the test can check that
whatever state file survives a kill equals one that was being saved. Large, frequent saves: a raw replay
buffer of 2,000 samples and the full-scheme default cnn with Adam state (~1.1 MB per save), saved
after every batch of 6 samples. After each save it prints the position it reached (one line).

With ``--gated`` it takes one line from stdin before each batch it learns: the parent hands out
batches and so decides how far the child can get, which makes a kill land mid-stream however slowly
the parent runs. At end of input it stops waiting and runs to the end of the stream.

    python _kill_worker.py STATE LOG SAMPLES [--gated]
"""

from __future__ import annotations

import os
import sys

import torch

import ondevice
from ondevice.continual import Learner, LearnerConfig, create_learner
from ondevice.continual.state import snapshot_learner, write_snapshot
from ondevice.data import Stream, load_digits


def main(state: str, log: str, samples: int, *, gated: bool = False) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ondevice.create_model("cnn", num_classes=2)  # ~93 k parameters: ~1.1 MB saves with Adam
    prepared = ondevice.prepare(model, "full")
    if os.path.exists(state):
        learner = Learner.restore(state, prepared)
    else:
        learner = create_learner(
            prepared,
            "replay",
            buffer_size=2000,
            optimizer="adam",
            lr=0.005,
            config=LearnerConfig(replay_steps=1, replay_batch_size=8),
            policy="reservoir",
        )
    data = load_digits().subset(slice(0, samples))
    skip = learner.samples_seen
    position = 0
    for x, y in Stream(data, batch_size=6):
        position += int(y.shape[0])
        if position <= skip:
            continue
        if gated and not sys.stdin.readline():
            gated = False  # the parent closed stdin: run to the end
        learner.observe(x, y)
        snapshot = snapshot_learner(learner)
        with open(log, "a") as handle:
            handle.write(f"{learner.samples_seen} {snapshot[1]['digest']}\n")
            handle.flush()
            os.fsync(handle.fileno())
        write_snapshot(state, snapshot)
        print(learner.samples_seen, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), gated="--gated" in sys.argv[4:])
