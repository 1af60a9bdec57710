"""The network side: the TLS listener and admission, sessions and the hub that connects them to
the tokens, the local control socket, the admin dispatcher, TLS reload and rights on reload."""
