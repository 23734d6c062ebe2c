"""The aiohttp application: settings, container, middleware, REST v1, the gateway, the CLI."""
