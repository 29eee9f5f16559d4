"""Tests of the test rig itself (tests/support): the FUSE mount, Azurite, the token
server, the network guard and the blob proxy.

Kept apart from the product tests so that a failure here reads as "the rig is
broken", not "ingestd is". ``pytest`` from the repo root collects both.
"""
