"""What operators read: the status document and table, and the Prometheus endpoint. Both take
the read-only `bridge_server.view.ServerView`."""
