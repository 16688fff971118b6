"""The zones fio emulates in a regular file under ``zonemode=zbd`` (sans-I/O).

Theory of operation. fio runs a zoned-device workload on a regular file by keeping the
zones in memory only (its model ZBD_NONE): the file is cut into ``zonesize`` zones (the
last one may run past the file's end), every zone sequential-write-required, EMPTY, its
write pointer at its start, ``zonecapacity`` bytes writable. Nothing about the zones is
stored in the file: every run starts with all zones empty, whatever the file holds.

One ``ZonedFile`` is shared by every job and clone of a run that names the file (fio
shares ``zbd_info`` by file name), so ``numjobs=16`` on one file write the same zones and
count against one ``max_open_zones``. Each job (each clone) looks at it through a
``ZoneRange``: its region in whole zones, its block sizes and options, its open zones
and its zone-reset count. Every I/O the job generates is adjusted here before it is
issued, as ``zbd_adjust_block`` does:

* a write goes to the write pointer of the zone its offset falls in. That zone must be
  open, or be opened (at most ``max_open_zones`` per file, ``job_max_open_zones`` per job;
  0 is no limit); if it cannot be, the write goes to one of the job's open zones, or a
  new one is opened after it (wrapping in the region), or the job ends. A full zone is
  reset (its write pointer back to its start) before the write, and so is one that
  ``zone_reset_frequency`` picks once the data below the write pointers reaches
  ``zone_reset_threshold`` of the region. A zone is closed when a write fills it.
* a read (unless ``read_beyond_wp``) lands below the write pointer of a zone with data:
  an empty zone is skipped to the next one with data (or, for random reads, the nearest
  one either way); no zone with data left ends the job.
* a trim resets its zone (``bs`` must be the zone size); a random trim of an empty zone
  moves to the nearest zone with data. For a regular file fio's reset moves the write
  pointer only: the data stays in the file (it does not discard or punch), so neither
  does the caller.
* a sequential job with ``zoneskip`` moves on, after a zone's worth (or at a read's write
  pointer), ``zoneskip`` bytes past the zone (the caller walks it, ``Clone._zone_skip``).
* a job that writes first re-arms the reset frequency and, with ``verify``, resets every
  zone of its region, so that no reset is needed (and no verified data lost) later;
  with ``verify`` a full zone is never reused.

The write pointer moves when a write is issued (fio moves it when the I/O is queued).
fio closes a zone when the write that fills it completes, and a thread that looks at the
zone meanwhile waits on the zone's lock until then; here the zone is closed when that
write is issued -- what the other writer sees once it has waited. The caller orders the
I/Os that overlap in the file, so data lands in the order it was issued.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from blockemu.errors import InvalidArgument

UINT_MAX = (1 << 32) - 1


@dataclass
class Zone:
    start: int
    capacity: int
    wp: int
    opener: "ZoneRange | None" = None  # the job that opened it; None: not open

    @property
    def capacity_end(self) -> int:
        return self.start + self.capacity

    def full(self, need: int) -> bool:
        """Fewer than ``need`` writable bytes are left."""
        return self.wp + need > self.capacity_end


class ZonedFile:
    """The zones of one file, shared by every job that names it."""

    def __init__(self, file_size: int, zone_size: int, capacity: int, max_open: int) -> None:
        if zone_size < 512:
            raise InvalidArgument(f"zone size must be at least 512 bytes for --zonemode=zbd, not {zone_size}")
        if capacity > zone_size:
            raise InvalidArgument(f"job parameter zonecapacity {capacity} is larger than zone size {zone_size}")
        if file_size < zone_size:
            raise InvalidArgument(f"file/device size {file_size} is smaller than zone size {zone_size}")
        self.size, self.zone_size, self.max_open = file_size, zone_size, max_open
        count = -(-file_size // zone_size)
        self.zones = [Zone(i * zone_size, capacity or zone_size, i * zone_size) for i in range(count)]
        self.open: list[int] = []  # fio's open_zones[]: the order picks among them
        self.valid = 0  # bytes below the write pointers (zone_reset_threshold is a share of it)
        self.write_cnt = UINT_MAX  # writes left until zone_reset_frequency resets a zone

    def index(self, offset: int) -> int:
        """The zone ``offset`` falls in; past the last zone, the count of zones (fio's sentinel)."""
        return min(offset // self.zone_size, len(self.zones))

    def start_of(self, index: int) -> int:
        return index * self.zone_size

    def written(self) -> dict[int, int]:
        """Each zone with data: its start -> the bytes below its write pointer."""
        return {z.start: z.wp - z.start for z in self.zones if z.wp > z.start}


@dataclass
class ZoneRange:
    """One job's (one clone's) view of a zoned file: fio's ``file_offset``/``io_size`` in
    whole zones, and the options that shape how it uses them."""
    zf: ZonedFile
    start: int
    length: int
    min_bs: tuple[int, int, int]  # per direction: read, write, trim
    random: bool = False
    verify: bool = False
    read_beyond_wp: bool = False
    job_max_open: int = 0
    reset_threshold: float = 0.0
    reset_frequency: float = 0.0
    opened: int = 0  # zones this job holds open (job_max_open_zones)
    resets: int = 0  # fio's nr_zone_resets
    lo: int = field(init=False)
    hi: int = field(init=False)

    def __post_init__(self) -> None:
        self.lo, self.hi = self.zf.index(self.start), self.zf.index(self.start + self.length)

    def _in_range(self, offset: int) -> bool:
        return 0 <= offset - self.start < self.length

    # --- zone state changes -------------------------------------------------------------

    def _open(self, i: int) -> bool:
        """zbd_open_zone: True if zone ``i`` is open or may be opened now."""
        z, zf = self.zf.zones[i], self.zf
        if self.verify and z.full(self.min_bs[1]):
            return False  # reusing it would reset verified data
        if not zf.max_open:
            return True  # no limit: open zones are not tracked
        if z.opener is not None:
            return True
        if self.job_max_open and self.opened >= self.job_max_open or len(zf.open) >= zf.max_open:
            return False
        zf.open.append(i)
        z.opener = self
        self.opened += 1
        return True

    def _close(self, i: int) -> None:
        z = self.zf.zones[i]
        if z.opener is not None:
            self.zf.open.remove(i)
            z.opener.opened -= 1
            z.opener = None

    def _reset(self, z: Zone) -> None:
        """zbd_reset_zone: the write pointer back to the zone's start (an empty zone is left alone)."""
        if z.wp == z.start:
            return
        self.zf.valid -= z.wp - z.start
        z.wp = z.start
        self.resets += 1

    def begin(self) -> None:
        """zbd_file_reset, when a job that writes starts: the reset frequency's count starts
        over, and with verify every zone of the region is closed and reset."""
        if self.verify:
            for i in range(self.lo, self.hi):
                self._close(i)
                self._reset(self.zf.zones[i])
        self.zf.write_cnt = min(int(1 / self.reset_frequency), UINT_MAX) if self.reset_frequency else UINT_MAX

    def _reset_due(self) -> bool:
        """zone_reset_threshold/frequency: once the data below the write pointers reaches the
        threshold's share of the region, every 1/frequency-th write resets its zone first."""
        if not self.reset_frequency or self.zf.valid < self.length * self.reset_threshold:
            return False
        self.zf.write_cnt = max(0, self.zf.write_cnt - 1)
        if self.zf.write_cnt:
            return False
        self.zf.write_cnt = min(int(1 / self.reset_frequency), UINT_MAX)
        return True

    # --- adjusting I/Os -------------------------------------------------------------------

    def write(self, offset: int, length: int) -> tuple[int, int] | None:
        """Where a write of ``length`` generated at ``offset`` goes: (offset, length) at a write
        pointer, the write pointer moved past it; None when no zone can take it (the job ends)."""
        zf, min_bs = self.zf, self.min_bs[1]
        if length > zf.zone_size:
            raise InvalidArgument(f"I/O buflen {length} exceeds zone size {zf.zone_size}")
        i = zf.index(offset)
        z = zf.zones[i] if self._open(i) else self._other_zone(offset, min_bs)
        if z is None:
            return None
        if self._reset_due() or z.full(min_bs):
            self._reset(z)
            if z.capacity < min_bs:
                raise InvalidArgument(f"zone capacity {z.capacity} smaller than minimum block size {min_bs}")
        offset = z.wp
        n = min(length, z.capacity_end - offset) // min_bs * min_bs  # at least min_bs: the zone is not full
        z.wp += n
        zf.valid += n
        if z.wp >= z.capacity_end:
            self._close(zf.index(z.start))
        return offset, n

    def _pick(self, offset: int) -> int:
        """pick_random_zone_idx: an index into the open zones, from where the offset falls."""
        return (offset - self.start) * len(self.zf.open) // self.length

    def _other_zone(self, offset: int, min_bs: int) -> Zone | None:
        """zbd_convert_to_open_zone: one of the job's open zones with room, else a zone after
        it (wrapping in the region) that may be opened, else any open zone of the job with
        room; None if there is none."""
        zf = self.zf
        limited = bool(zf.max_open or self.job_max_open)
        i = min(max(zf.index(offset), self.lo), self.hi - 1)
        if limited and zf.open:  # start from a quasi-random open zone, the first of the job's
            n, first = len(zf.open), self._pick(offset)
            mine = [j for j in (zf.open[(first + k) % n] for k in range(n)) if self.lo <= j < self.hi]
            if not mine:
                return None
            i = mine[0]
        if (zf.open or not limited) and not zf.zones[i].full(min_bs):
            return zf.zones[i]
        for _ in range(self.length // zf.zone_size):
            i += 1
            if not self._in_range(zf.start_of(i)):
                i = self.lo
            if zf.zones[i].opener is None and self._open(i):
                return zf.zones[i]
        for j in zf.open:
            if self.lo <= j < self.hi and not zf.zones[j].full(min_bs):
                return zf.zones[j]
        return None

    def _with_data(self, i: int, need: int) -> Zone | None:
        """zbd_find_zone: the next zone after ``i`` with ``need`` bytes below its write
        pointer; for random I/O the nearest one either way."""
        zones = self.zf.zones
        up, down = i + 1, i - 1
        while up < self.hi or down >= self.lo:
            if up < self.hi:
                if zones[up].start + need <= zones[up].wp:
                    return zones[up]
            elif not self.random:
                break
            if self.random and down >= self.lo and zones[down].start + need <= zones[down].wp:
                return zones[down]
            up, down = up + 1, down - 1
        return None

    def readable(self) -> bool:
        """Is there anything to read: data below a write pointer of the file, or reads beyond them?"""
        return self.read_beyond_wp or self.zf.valid > 0

    def read(self, offset: int, length: int) -> tuple[int, int] | None:
        """Where a read goes: below the write pointer of its zone or of the next (nearest) zone
        with data; None when no zone has data (the job's pass ends)."""
        if self.read_beyond_wp:
            return offset, length
        zf, min_bs = self.zf, self.min_bs[0]
        i = zf.index(offset)
        origin = zf.zones[i].start
        z: Zone | None = zf.zones[i]
        assert z is not None
        span = z.wp - z.start
        if span < min_bs or not self.random and offset + min_bs > z.wp:
            z = self._with_data(i, min_bs)
            if z is None:
                return None
            span = z.wp - z.start
            if not self.random:
                offset = z.start
        if span <= length:
            offset = z.start
        elif self.random:
            offset = z.start + (offset - origin) % (span - length) // min_bs * min_bs
        return offset, min(length, z.wp - offset) // min_bs * min_bs

    def trim(self, offset: int) -> int | None:
        """A trim is a zone reset (fio's zbd_do_io_u_trim): at ``offset``, or for a random trim
        of an empty zone at the nearest zone with data (None: there is none, the pass ends).
        The zone is reset here; for a regular file that is all a trim does."""
        zf = self.zf
        i = zf.index(offset)
        z: Zone | None = zf.zones[i]
        assert z is not None
        if self.random and z.wp == z.start:
            z = self._with_data(i, 1)
            if z is None:
                return None
            offset = z.start
        if offset != z.start:
            raise InvalidArgument(f"Trim offset not at zone start ({offset})")
        self._reset(z)
        return offset

    def skip_capacity_gap(self, offset: int) -> int:
        """A sequential writer past a zone's capacity goes on at the next zone's start
        (setup_zbd_zone_mode), rather than reset the zone it filled."""
        zf = self.zf
        i = zf.index(offset)
        if i < len(zf.zones) and offset >= zf.zones[i].capacity_end:
            return zf.start_of(i + 1)
        return offset


def region_in_zones(zone_size: int, nzones: int, start: int, length: int, reads_only: bool,
                    name: str) -> tuple[int, int, list[str]]:
    """zbd_verify_sizes: a job that writes or trims works on whole zones -- its offset
    rounded up to a zone boundary, its end down (to the file's last zone at most); fio's
    info lines say so. A read job keeps its region."""
    notes: list[str] = []
    if reads_only:
        return start, length, notes
    end_zone = min(nzones, (start + length) // zone_size)
    if start % zone_size:
        new = (start // zone_size + 1) * zone_size
        if new >= start + length:
            raise InvalidArgument(f"{name}: io_size must be at least one zone")
        notes.append(f"{name}: rounded up offset from {start} to {new}")
        length -= new - start
        start = new
    end = end_zone * zone_size
    if start + length != end:
        if end <= start:
            raise InvalidArgument(f"{name}: io_size must be at least one zone")
        notes.append(f"{name}: rounded down io_size from {length} to {end - start}")
        length = end - start
    return start, length, notes

