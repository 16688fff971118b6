"""The extent keys reads derived lately, kept while their master key is live.

A read of an encrypted extent derived its AES-256-XTS key (HKDF-SHA512 over the master
secret and the extent's nonce) afresh every time, and wiped it after: in the stress mix, whose
partial-page writes and whole-file reads come back to the same extents, that was ~2.5 % of the
event loop's time. Linux keeps what it derives the same way: btrfs's encrypted extents keep
their ``fscrypt_extent_info`` (the prepared key) in the extent map as long as the map is
cached, and fscrypt wipes it when the master key goes.

So this holds *derived secrets* beyond a single read: at most ``limit`` extent keys, each
remembered with the secret object it came from. An entry is used only while that very secret
is the one the keyring hands out (a key removed and added again is a new object), and every
entry of a master key is wiped as soon as the keyring wipes that key's secret (``forget``, on
``Keyring.on_wipe``): a hard removal, the last lease of a soft removal letting go, unmount's
``wipe_all``. An entry pushed out by newer ones is wiped as it goes.
"""
from __future__ import annotations

from collections import OrderedDict

from blockemu.crypto import fscrypt


class ExtentKeys:
    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        # nonce -> (the master secret it was derived from, that key's identifier, the extent key)
        self._keys: OrderedDict[bytes, tuple[bytearray, bytes, bytearray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, secret: bytearray, key_id: bytes, nonce: bytes) -> bytearray:
        """The extent key of ``nonce`` under ``secret``: the cache's own buffer, valid until the
        caller next awaits (a removal may wipe it then) -- a caller that awaits with it in use
        takes a copy and wipes that."""
        hit = self._keys.get(nonce)
        if hit is not None:
            if hit[0] is secret:
                self._keys.move_to_end(nonce)
                return hit[2]
            fscrypt.wipe(hit[2])
            del self._keys[nonce]
        key = fscrypt.extent_key(secret, nonce)
        self._keys[nonce] = (secret, key_id, key)
        if len(self._keys) > self.limit:
            fscrypt.wipe(self._keys.popitem(last=False)[1][2])
        return key

    def forget(self, key_id: bytes) -> None:
        """The keyring wiped this master key's secret: every extent key derived from it goes too."""
        for nonce in [n for n, (_, kid, _) in self._keys.items() if kid == key_id]:
            fscrypt.wipe(self._keys.pop(nonce)[2])
