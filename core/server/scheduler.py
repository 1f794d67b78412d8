"""Between requests and the engine: tickets wait in a bounded queue, one thread admits them
into the engine's running ``Batch`` at every step and hands each ticket its rows' deltas. No HTTP here: a ticket's
output is a plain callback, and ``StreamTicket`` turns it into an asyncio stream."""

import asyncio
import collections
import contextlib
import threading
import time


class Ticket:
    """One request's rows, and ``deliver``, called from the scheduler's thread with each of
    their ``Delta``s, then, once all have left the engine, their end: ``None``, or the
    exception that failed one of them."""

    def __init__(self, rows, deliver):
        self.rows, self.deliver = rows, deliver
        self.done = False  # the end of its deltas was delivered
        self.error = None  # a row's error, delivered as its end once its other rows have left
        self.submitted_step = 0  # the scheduler's step count when it was queued

    @property
    def finished(self):
        return all(row.finish_reason is not None for row in self.rows)

    def cancel(self):
        for row in self.rows:
            row.cancel()


class StreamTicket(Ticket):
    """A ticket read from asyncio: make it inside the event loop, iterate ``deltas()``."""

    def __init__(self, rows):
        super().__init__(rows, self._push)
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def _push(self, item):
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def deltas(self):
        """The rows' deltas until all finished (a failed batch raises its error); cancels the
        rows if abandoned before."""
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            if not self.finished:
                self.cancel()  # the client went away: free its rows at the next step


class QueueFull(Exception):
    pass


class Scheduler:
    """Runs every forward in one background thread, over one continuous ``Batch``.

    At every step, waiting tickets are admitted into the running batch while their rows fit in
    ``max_batch_size`` (any mix of adapters); the batch prefills them together, then decodes
    every running row by one token, and rows leave the moment they finish. So a request waits
    for at most the step in progress when it arrived (``max_admission_wait_steps``).
    ``continuous=False`` admits only into an empty batch, as a batch-at-a-time scheduler does
    (the benchmark's baseline). A request whose row failed gets that row's error; the other
    requests go on.
    """

    def __init__(self, engine, max_queue, max_batch_size, batch_window_s=0.01, continuous=True):
        self.engine, self.max_queue, self.max_batch_size, self.batch_window_s = engine, max_queue, max_batch_size, batch_window_s
        self.continuous = continuous
        self.waiting = collections.deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="ftengine-scheduler", daemon=True)
        self.stats = {
            "requests": 0,
            "batches": 0,  # times the batch started from empty
            "shared_forwards": 0,  # forwards holding rows of more than one request
            "max_batch_rows": 0,
            "max_batch_adapters": 0,
            "max_admission_wait_steps": 0,
        }
        self.step_count = 0

    def start(self):
        self.thread.start()

    def stop(self):
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join()

    def submit(self, ticket):
        """Queue ``ticket``; ``QueueFull`` when ``max_queue`` tickets already wait."""
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            ticket.submitted_step = self.step_count
            self.waiting.append(ticket)
            self.stats["requests"] += 1
            self.condition.notify()

    def snapshot(self):
        """The scheduler's and the engine's counters, and the queue's length (``waiting``)."""
        with self.condition:
            own = {**self.stats, "waiting": len(self.waiting)}
        return {**self.engine.stats(), **own}

    def _take(self, room, at_least_one):
        """Waiting tickets, in order, while their rows fit in ``room`` (the first one anyway
        when ``at_least_one``: nothing runs)."""
        taken = []
        with self.condition:
            while self.waiting and (len(self.waiting[0].rows) <= room or (at_least_one and not taken)):
                ticket = self.waiting.popleft()
                room -= len(ticket.rows)
                if not all(row.cancelled for row in ticket.rows):
                    taken.append(ticket)
                    self.stats["max_admission_wait_steps"] = max(
                        self.stats["max_admission_wait_steps"], self.step_count - ticket.submitted_step
                    )
                else:  # abandoned while it waited: its end is still delivered
                    ticket.done = True
                    ticket.deliver(None)
        return taken

    def _loop(self):
        batch = self.engine.batch()
        owners = {}  # id(row) -> its ticket (rows are dataclasses, equal by value)
        while True:
            with self.condition:
                if not batch and not self.waiting:
                    if self.stopping:
                        return
                    self.condition.wait(timeout=0.5)
                    continue
                has_waiting = bool(self.waiting)
            if has_waiting and (self.continuous or not batch) and len(batch) < self.max_batch_size:
                self._admit(batch, owners)
            tickets = {id(t): t for t in owners.values()}.values()
            sharing = sum(1 for t in tickets if not t.finished) > 1
            try:
                for deltas in batch.step():
                    with self.condition:
                        self.stats["shared_forwards"] += sharing
                    self._deliver(deltas, owners)
            except Exception as exc:  # a failed step fails its requests, not the server
                batch.close()
                for ticket in tickets:
                    ticket.error = ticket.error or exc
                batch, owners = self.engine.batch(), {}
            with self.condition:
                self.step_count += 1
            # A ticket's end goes out only once its rows have left the engine (cancelled ones
            # too): the end releases its adapter, which may then be evicted or unloaded.
            for ticket in list(tickets):
                if ticket.finished and not ticket.done:
                    ticket.done = True
                    ticket.deliver(ticket.error)
                if ticket.done and ticket.finished:
                    for row in ticket.rows:
                        owners.pop(id(row), None)

    def _admit(self, batch, owners):
        if not batch:
            time.sleep(self.batch_window_s)  # let requests sent together arrive together
        tickets = self._take(self.max_batch_size - len(batch), at_least_one=not batch)
        if not tickets:
            return
        with self.condition:
            self.stats["batches"] += not batch
        batch.admit([row for ticket in tickets for row in ticket.rows])
        owners.update({id(row): ticket for ticket in tickets for row in ticket.rows})
        rows = batch.rows + batch.pending
        with self.condition:
            self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
            self.stats["max_batch_adapters"] = max(self.stats["max_batch_adapters"], len({r.adapter for r in rows}))

    @staticmethod
    def _deliver(deltas, owners):
        """Each delta to its ticket; a failed row's error becomes its ticket's end (its other
        rows are cancelled and leave at the next step)."""
        for delta in deltas:
            ticket = owners[id(delta.row)]
            if ticket.done or ticket.error is not None:
                continue
            if delta.finish_reason == "error":
                ticket.error = delta.row.error
                ticket.cancel()
            else:
                ticket.deliver(delta)
