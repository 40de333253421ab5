"""What the tests share: fleets, hand-driven devices, brokers, token data, polling.

Test modules import from here and never from one another, so a test file can be moved, split
or deleted without breaking another; nothing here imports a test module. Importing this package
imports nothing heavy (``helpers.torch_free`` must be able to hide torch before anything loads it).
"""
