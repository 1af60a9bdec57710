"""tokenbridge: the operator's command line (`tokenbridge`), beside the two daemons.

Status and actions through a server's control socket or over mTLS, the PKI bootstrap,
`doctor` for a build VM, `install-service`, `audit verify`, and the narrated demo. It uses the
daemons' packages (config, status rendering, the audit chain) and nothing uses it back.
"""
