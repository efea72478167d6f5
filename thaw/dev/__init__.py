"""Dev and bench only, not shipped in the runtime bundle: ``thaw demo``, the pod sandbox of the
tests and the demo, and the CPU stand-in server.

May import anything in Thaw.
"""
