"""HTTP servers: gunicorn serving with TLS reload and metrics, certificates, and the certificate
controller (``thaw certs``).

Imports ``thaw.contract`` and ``thaw.errors``.
"""
