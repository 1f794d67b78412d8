"""Between requests and the engine: tickets wait in a bounded queue, one thread batches them
into ``AdapterServer.run`` and hands each ticket its rows' deltas. No HTTP here: a ticket's
output is a plain callback, and ``StreamTicket`` turns it into an asyncio stream."""

import asyncio
import collections
import contextlib
import threading
import time


class Ticket:
    """One request's rows, and ``deliver``, called from the scheduler's thread with each of
    their ``Delta``s, the exception if their batch failed, then ``None`` once all finished."""

    def __init__(self, rows, deliver):
        self.rows, self.deliver = rows, deliver
        self.done = False  # the end of its deltas was delivered

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
    """Runs every forward in one background thread.

    Waiting tickets are taken together, up to ``max_batch_size`` rows, as one batch
    (``AdapterServer.run``); while batches run, new tickets start another batch at once, and
    the batches are stepped in turn. ``stats`` counts forwards and *shared* forwards (rows of
    more than one request in one forward).
    """

    def __init__(self, engine, max_queue, max_batch_size, batch_window_s=0.01):
        self.engine, self.max_queue, self.max_batch_size, self.batch_window_s = engine, max_queue, max_batch_size, batch_window_s
        self.waiting = collections.deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="ftengine-scheduler", daemon=True)
        self.stats = {
            "requests": 0,
            "batches": 0,
            "forwards": 0,
            "shared_forwards": 0,
            "max_batch_rows": 0,
            "max_batch_adapters": 0,
            "cancelled_rows": 0,
        }
        self.running_rows = 0

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
            self.waiting.append(ticket)
            self.stats["requests"] += 1
            self.condition.notify()

    def snapshot(self):
        with self.condition:
            return {**self.stats, "waiting": len(self.waiting), "running_rows": self.running_rows}

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
                else:  # abandoned while it waited: its end is still delivered
                    ticket.done = True
                    ticket.deliver(None)
        return taken

    def _loop(self):
        active = []  # [(step iterator, tickets, {id(row): its ticket})]
        while True:
            with self.condition:
                if not active and not self.waiting:
                    if self.stopping:
                        return
                    self.condition.wait(timeout=0.5)
                    continue
                has_waiting = bool(self.waiting)
            room = self.max_batch_size - sum(len(t.rows) for _, tickets, _ in active for t in tickets if not t.finished)
            if has_waiting and room > 0:
                if not active:
                    time.sleep(self.batch_window_s)  # let requests sent together arrive together
                tickets = self._take(room, at_least_one=not active)
                if tickets:
                    rows = [row for ticket in tickets for row in ticket.rows]
                    # Rows are dataclasses, equal by value: the batch maps them to tickets by identity.
                    owners = {id(row): ticket for ticket in tickets for row in ticket.rows}
                    active.append((self.engine.run(rows), tickets, owners))
                    self.stats["batches"] += 1
                    self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
                    self.stats["max_batch_adapters"] = max(self.stats["max_batch_adapters"], len({r.adapter for r in rows}))
            for entry in list(active):
                steps, tickets, owners = entry
                sharing = sum(1 for t in tickets if not t.finished) > 1
                try:
                    deltas = next(steps)
                except StopIteration:
                    active.remove(entry)
                    with self.condition:
                        self.stats["cancelled_rows"] += sum(1 for t in tickets for r in t.rows if r.finish_reason == "cancelled")
                    continue
                except Exception as exc:  # a failed batch fails its requests, not the server
                    active.remove(entry)
                    for ticket in tickets:
                        ticket.deliver(exc)
                    continue
                with self.condition:
                    self.stats["forwards"] += 1
                    self.stats["shared_forwards"] += sharing
                    self.running_rows = sum(1 for _, ts, _ in active for t in ts for r in t.rows if r.finish_reason is None)
                for delta in deltas:
                    owners[id(delta.row)].deliver(delta)
                for ticket in tickets:
                    if ticket.finished and not ticket.done:
                        ticket.done = True
                        ticket.deliver(None)
