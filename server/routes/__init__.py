"""HTTP routes: thin functions that validate the body (schemas) and call a handler on `app.state`."""
