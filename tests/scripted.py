"""A ``script=module:func`` job for tests: gets the mounted filesystem and a seeded RNG."""


async def touch_files(fs, rng):
    names = [f"/s{rng.randrange(1000)}" for _ in range(3)]
    for n in names:
        async with fs.open(n, "w") as f:
            await f.write(b"scripted")
    return sorted(set(names))


async def interrupt_when_laid_out(fs, rng):
    """SIGINT to this process once the fio job beside it has laid out its file: the run must
    stop its jobs and still report (fio's partial results)."""
    import asyncio
    import os
    import signal
    while not await fs.exists("/jobs/long.0.0"):
        await asyncio.sleep(0.01)  # polls a condition, not a timing guess
    os.kill(os.getpid(), signal.SIGINT)
    return "sent SIGINT"


async def divide_by_zero(fs, rng):
    """A script's own bug: the run reports it as the job's failure, in one line."""
    return 1 // 0
