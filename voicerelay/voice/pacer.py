"""Outgoing audio paced on the call's media clock, sans-IO.

Agent audio is cut into frames as it is enqueued and goes out one frame per slot:

- The media clock starts at the first enqueue (t0). From idle, the first frame is due at the
  enqueue's `now`; while audio keeps coming, each slot follows the previous one by one frame.
  Audio that comes after its slot went by (the queue ran dry) is due when it is enqueued.
- A frame popped within one frame of its due time keeps that slot (timer jitter is absorbed).
  One popped a frame or more late (a late timer: counted `late_slots`) goes out in a slot
  re-anchored at the pop's `now`, and the next is due one frame after it: never a catch-up
  burst.
- RTP timestamp of a frame, in `clock_rate` units (default: `rate`; Opus's RTP clock is 48 kHz
  whatever rate the audio is at) = max(previous + one frame, round((slot - t0) * clock_rate))
  mod 2**32: continuous across pauses (a pause advances it by the time that passed), never
  backwards.
- `marker` is set on the first frame of a talkspurt: the first ever, the first after clear(),
  and the first after the queue ran dry and a slot went by without audio.
- `underruns`: the queue ran dry while its item was unfinished and a slot went by before more
  audio came (the backend is slower than real time). `dropped_frames`: beyond max_queued_s.

Items: every frame belongs to an `item_id` (None is an item too). finish(item) pads the item's
held partial frame with zeros; done_items() then reports the item once its last frame went out.
A partial frame held for one item is padded and queued when audio of another item arrives.
clear() forgets pending finishes: a caller that calls finish() on an item after clearing it
gets it reported done with what was sent.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

TS_MOD = 1 << 32
KEEP_ITEMS = 256  # per-item sent counts kept for sent_ms() (oldest forgotten first)


@dataclass(frozen=True, eq=False)
class OutFrame:
    """One frame to encode and send now."""

    pcm: np.ndarray  # frame_samples int16 at `rate`
    timestamp: int  # media-clock RTP timestamp (no random offset: the RTP sender adds it)
    marker: bool  # first frame of a talkspurt
    item_id: str | None


class Pacer:
    """Queues agent audio in frames and releases at most one per frame duration."""

    def __init__(
        self,
        *,
        rate: int = 48000,
        frame_samples: int = 960,
        max_queued_s: float = 300.0,
        clock_rate: int | None = None,
    ) -> None:
        if rate <= 0 or frame_samples <= 0 or max_queued_s <= 0:
            raise ValueError("pacer: rate, frame_samples and max_queued_s must be positive")
        self.rate = rate
        self.clock_rate = clock_rate or rate
        self.frame_ticks = round(frame_samples * self.clock_rate / rate)  # one frame on the clock
        self.frame_samples = frame_samples
        self.frame_duration = frame_samples / rate
        self.frame_ms = round(frame_samples * 1000 / rate)
        self.max_frames = max(1, int(max_queued_s * rate / frame_samples))
        self._frames: deque[tuple[np.ndarray, str | None]] = deque()
        self._held: np.ndarray | None = None  # a partial frame of `_held_item`
        self._held_item: str | None = None
        self._queued_of: dict[str | None, int] = {}  # item -> frames queued
        self._finished: set[str | None] = set()  # finished, frames still queued
        self._done: list[tuple[str | None, int]] = []
        self._sent: OrderedDict[str | None, int] = OrderedDict()  # item -> frames sent
        self._t0: float | None = None
        self._due: float | None = None  # when the queue's head is due
        self._slot: float | None = None  # slot of the last frame sent
        self._ts: int | None = None  # unwrapped timestamp of the last frame sent
        self._sent_any = False  # a frame went out since the last clear()
        self._last_item: str | None = None  # ... and its item
        self._last_enqueue = 0.0
        self._dry = True  # the queue ran out after the last frame sent (or nothing sent yet)
        self._dry_unfinished = False  # ... while that frame's item still had audio to come
        self._talkspurt = True  # the next frame starts a talkspurt (first ever, after clear)
        self.counters: dict[str, int] = {
            "frames_sent": 0,
            "underruns": 0,
            "late_slots": 0,
            "dropped_frames": 0,
        }

    # Audio in ------------------------------------------------------------------------------
    def enqueue(self, pcm: np.ndarray, item_id: str | None, now: float) -> None:
        """Queue int16 audio at `rate`; a trailing partial frame waits for more or finish()."""
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"pacer takes 1-D int16 audio, not {pcm.ndim}-D {pcm.dtype}")
        if self._t0 is None:
            self._t0 = now
        self._last_enqueue = now
        if self._held is not None and self._held_item != item_id:
            self._queue_held(now)
        audio = pcm if self._held is None else np.concatenate((self._held, pcm))
        if audio is pcm:
            audio = pcm.copy()  # frames are views of our own copy: the caller may reuse pcm
        whole = len(audio) - len(audio) % self.frame_samples
        for start in range(0, whole, self.frame_samples):
            self._queue_frame(audio[start : start + self.frame_samples], item_id, now)
        self._held = audio[whole:] if whole < len(audio) else None
        self._held_item = item_id

    def finish(self, item_id: str | None, now: float | None = None) -> None:
        """No more audio for `item_id`: its partial frame is padded with zeros and queued
        (due no earlier than `now`, by default the last enqueue's time)."""
        if self._held is not None and self._held_item == item_id:
            self._queue_held(self._last_enqueue if now is None else now)
        if self._sent_any and self._last_item == item_id:
            self._dry_unfinished = False  # running dry now is the end of the item
        if self._queued_of.get(item_id, 0):
            self._finished.add(item_id)
        else:
            self._done.append((item_id, self.sent_ms(item_id)))

    def _queue_held(self, now: float) -> None:
        assert self._held is not None
        frame = np.zeros(self.frame_samples, np.int16)
        frame[: len(self._held)] = self._held
        item, self._held = self._held_item, None
        self._queue_frame(frame, item, now)

    def _queue_frame(self, frame: np.ndarray, item_id: str | None, now: float) -> None:
        if len(self._frames) >= self.max_frames:
            self.counters["dropped_frames"] += 1
            return
        if not self._frames:
            self._due = now if self._slot is None else max(now, self._slot + self.frame_duration)
        self._frames.append((frame, item_id))
        self._queued_of[item_id] = self._queued_of.get(item_id, 0) + 1

    # Frames out ----------------------------------------------------------------------------
    def next_due(self) -> float | None:
        """When the next frame is due; None when no whole frame is queued."""
        return self._due if self._frames else None

    def pop_due(self, now: float) -> OutFrame | None:
        """The next frame if it is due at `now` (at most one per call)."""
        if not self._frames or self._due is None or now < self._due:
            return None
        pcm, item = self._frames.popleft()
        slot = self._slot_for(now)
        gap = self._slot is None or slot > self._slot + self.frame_duration * 1.000001
        marker = self._talkspurt or (self._dry and gap)
        if self._dry and gap and self._dry_unfinished:
            self.counters["underruns"] += 1
        timestamp = self._stamp(slot)
        self._slot, self._due = slot, slot + self.frame_duration
        self._talkspurt = False
        complete = self._account_sent(item)
        self._dry = not self._frames
        self._dry_unfinished = self._dry and not complete
        return OutFrame(pcm, timestamp % TS_MOD, marker, item)

    def _slot_for(self, now: float) -> float:
        """The frame keeps its due slot unless popped a whole frame late (then: now)."""
        assert self._due is not None
        if now < self._due + self.frame_duration:
            return self._due
        self.counters["late_slots"] += 1
        return now

    def _stamp(self, slot: float) -> int:
        assert self._t0 is not None
        clock = round((slot - self._t0) * self.clock_rate)
        self._ts = clock if self._ts is None else max(self._ts + self.frame_ticks, clock)
        return self._ts

    def _account_sent(self, item: str | None) -> bool:
        """Count a frame of `item` sent; True if that was the item's last (it is done)."""
        self.counters["frames_sent"] += 1
        self._sent[item] = self._sent.pop(item, 0) + 1
        if len(self._sent) > KEEP_ITEMS:
            self._sent.popitem(last=False)
        self._sent_any, self._last_item = True, item
        left = self._queued_of[item] - 1
        if left:
            self._queued_of[item] = left
            return False
        del self._queued_of[item]
        if item not in self._finished:
            return False
        self._finished.discard(item)
        self._done.append((item, self.sent_ms(item)))
        return True

    # Barge-in and accounting ----------------------------------------------------------------
    def clear(self) -> tuple[str | None, int]:
        """Barge-in: drop everything queued (the held partial frame too). Returns the item of
        the last frame sent since the previous clear() and how many ms of that item went out;
        (None, 0) if nothing was sent since."""
        self._frames.clear()
        self._held = None
        self._queued_of.clear()
        self._finished.clear()
        self._due = None
        self._dry = True
        self._dry_unfinished = False
        self._talkspurt = True
        if not self._sent_any:
            return None, 0
        self._sent_any = False
        return self._last_item, self.sent_ms(self._last_item)

    def sent_ms(self, item_id: str | None) -> int:
        """Milliseconds of `item_id` that went out (0 for an unknown or long-forgotten item)."""
        return self._sent.get(item_id, 0) * self.frame_ms

    def done_items(self) -> list[tuple[str | None, int]]:
        """Items finished and fully sent since the last call: (item_id, sent_ms)."""
        done, self._done = self._done, []
        return done

    @property
    def queued_ms(self) -> int:
        """Audio waiting to go out, the held partial frame included."""
        samples = len(self._frames) * self.frame_samples
        if self._held is not None:
            samples += len(self._held)
        return samples * 1000 // self.rate
