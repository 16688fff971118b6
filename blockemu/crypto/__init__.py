"""Keys and encryption: fscrypt's HKDF-SHA512 and AES-256-XTS (``fscrypt``), the
keyring and its removal modes (``keyring``), and sealing -- encrypting and
checksumming extents at writeout -- in worker processes (``sealer`` in the
main process, ``sealworker`` in each worker).

May import ``blockemu.ondisk`` (checksums) and the common modules. The worker
imports only ``xts`` (AES-256-XTS through libcrypto) and ``ondisk.csum``: it starts in a
tenth of a second.
"""
