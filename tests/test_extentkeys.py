"""The extent keys reads keep (crypto/extentkeys.py) against a model: every key handed out is
the one HKDF derives from the secret live now, never one derived from a secret since replaced,
and every key it let go of -- pushed out, derived from a replaced secret, or of a master key the
keyring wiped -- is zeros."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blockemu.crypto import fscrypt
from blockemu.crypto.extentkeys import ExtentKeys

KEY_IDS = [b"A" * 16, b"B" * 16]
NONCES = [bytes([n]) * 16 for n in range(6)]

ops = st.lists(st.one_of(
    st.tuples(st.just("get"), st.sampled_from(KEY_IDS), st.sampled_from(NONCES)),
    st.tuples(st.just("wipe"), st.sampled_from(KEY_IDS), st.none()),  # the keyring zeroes the secret
    st.tuples(st.just("readd"), st.sampled_from(KEY_IDS), st.none()),  # removed, then added again
), max_size=60)


@settings(max_examples=300)
@given(ops, st.integers(1, 4))
def test_extent_keys_hand_out_only_live_keys_and_wipe_the_rest(steps, limit):
    cache = ExtentKeys(limit)
    secrets = {kid: bytearray(kid * 4) for kid in KEY_IDS}
    generation = {kid: 0 for kid in KEY_IDS}
    handed: list[tuple[bytes, int, bytearray]] = []  # every key got: (key id, its secret's generation, buffer)
    for op, kid, nonce in steps:
        if op == "get":
            if not any(secrets[kid]):
                continue  # a wiped key unlocks nothing (Keyring.secret_for refuses it)
            key = cache.get(secrets[kid], kid, nonce)
            assert key == fscrypt.extent_key(secrets[kid], nonce)
            handed.append((kid, generation[kid], key))
        else:  # the keyring wipes the secret and tells the cache (Keyring._wipe's on_wipe hook)
            fscrypt.wipe(secrets[kid])
            cache.forget(kid)
            if op == "readd":  # the same key identifier, a new secret object (as Keyring.add_key makes)
                generation[kid] += 1
                secrets[kid] = bytearray(kid[:1] * 64)
        assert len(cache) <= limit
        live = {id(k) for _, _, k in cache._keys.values()}
        for k_id, gen, buf in handed:
            if id(buf) not in live:
                assert not any(buf), "a key the cache let go of was not wiped"
            else:
                assert gen == generation[k_id] and any(secrets[k_id]), "a key of a wiped secret is still kept"
