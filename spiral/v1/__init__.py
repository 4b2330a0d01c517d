"""Generated protobuf messages and gRPC stubs of spiral's wire API, version 1.

The sources are ``protos/spiral/v1/*.proto``; regenerate with ``make proto``
(``python -m spiral.commands.protogen``). ``tests/test_protos.py`` fails when these files are stale.
"""
