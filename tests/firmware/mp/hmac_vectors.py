"""Reads 'key_hex msg_hex' lines on stdin, prints protocol.signing.hexdigest of each."""
import binascii
import sys

from protocol import signing

for line in sys.stdin:
    line = line.rstrip("\n")
    if not line:
        continue
    k, msg = line.split(" ")
    print(signing.hexdigest(binascii.unhexlify(k), binascii.unhexlify(msg)))
