"""`cxr-fastai serve`: HTTP API and page over an exported model (app.create_app, app.run)."""
