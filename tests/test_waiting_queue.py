"""The engine's waiting queue (one FIFO per floor) against a brute-force oracle over one list in arrival order,
and the operating point's cached hash across processes."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys

from prism_cli.operating_points import OperatingPoint
from prism_cli.serving.queue import WaitingQueue
from prism_cli.serving.requests import Request, SamplingParams

FLOORS = [OperatingPoint("linear", k) for k in (2, 4, 6, 8)]


def _filled(rng: random.Random, n: int) -> tuple[WaitingQueue, list[Request]]:
    queue, order = WaitingQueue(), []
    for i in range(n):
        r = Request([1, 2], SamplingParams(max_tokens=1), rng.choice(FLOORS), float(i))
        queue.push(r)
        order.append(r)
    return queue, order


def test_peek_and_oldest_are_the_virtual_queue_in_arrival_order():
    """Random floors, random virtual queues (sets of floors), random requests to skip: ``peek`` is the first
    ``n`` of the accepted requests in the order they entered, ``oldest`` the first of them not skipped."""
    rng = random.Random(0)
    for _ in range(300):
        queue, order = _filled(rng, rng.randrange(0, 40))
        accepted = set(rng.sample(FLOORS, rng.randrange(0, len(FLOORS) + 1)))
        skip = {id(r) for r in order if rng.random() < 0.3}
        n = rng.randrange(0, 12)
        expected = [r for r in order if r.floor in accepted]
        assert queue.peek(lambda f, a=accepted: f in a, n) == expected[:n]
        unskipped = [r for r in expected if id(r) not in skip]
        assert queue.oldest(lambda f, a=accepted: f in a, skip) is (unskipped[0] if unskipped else None)
        assert queue.oldest() is (order[0] if order else None)
        assert list(queue) == order


def test_heads_are_the_first_n_of_each_floor_in_arrival_order():
    """``heads(n)``: the first ``n`` requests of each floor in the order they entered, merged in that order (the
    prism policy takes every virtual queue's first ``n`` from it); ``floors`` counts each floor's requests."""
    rng = random.Random(1)
    for _ in range(200):
        queue, order = _filled(rng, rng.randrange(0, 40))
        gone = [r for r in order if rng.random() < 0.2]
        queue.remove(gone)
        order = [r for r in order if r not in gone]
        n = rng.randrange(0, 6)
        expected = [r for r in order if sum(o.floor == r.floor for o in order[: order.index(r)]) < n]
        assert queue.heads(n) == expected
        assert queue.floors() == {f: c for f in FLOORS if (c := sum(r.floor == f for r in order))}


def test_remove_takes_exactly_the_requests_given():
    """Random sets to remove (heads of the FIFOs, as a launch takes, or any): what stays is the oracle's list
    less those, in arrival order, and the count follows."""
    rng = random.Random(1)
    for _ in range(300):
        queue, order = _filled(rng, rng.randrange(0, 40))
        if rng.random() < 0.5:
            gone = [r for r in order if rng.random() < 0.3]
        else:
            gone = queue.peek(lambda f: True, rng.randrange(0, 8))
        rng.shuffle(gone)
        queue.remove(gone)
        expected = [r for r in order if r not in gone]
        assert list(queue) == expected and len(queue) == len(expected)


def test_a_pickled_point_is_rehashed_where_it_is_loaded():
    """A point hashes once, when made; string hashes differ between processes, so one pickled in another
    process (another ``PYTHONHASHSEED``) must not bring its hash along: it finds the same point in a dict here."""
    code = "import pickle, sys; from prism_cli.operating_points import OperatingPoint as P; " \
           "sys.stdout.buffer.write(pickle.dumps(P('linear', 6)))"
    for seed in ("1", "2"):
        data = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              check=True, capture_output=True).stdout
        point = pickle.loads(data)
        assert point == OperatingPoint("linear", 6)
        assert hash(point) == hash(("linear", 6))
        assert {OperatingPoint("linear", 6): "found"}[point] == "found"
