"""The HTTP API: app factory (`app.create_app`), routers, auth (JWT, roles), error answers."""
