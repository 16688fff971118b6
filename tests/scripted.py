"""A ``script=module:func`` job for tests: gets the mounted filesystem and a seeded RNG."""


async def touch_files(fs, rng):
    names = [f"/s{rng.randrange(1000)}" for _ in range(3)]
    for n in names:
        async with fs.open(n, "w") as f:
            await f.write(b"scripted")
    return sorted(set(names))
