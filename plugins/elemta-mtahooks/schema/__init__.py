"""The JSON Schemas (draft 2020-12) of what elemta-mtahooks sends (``request.json``) and
what a hook answers (``response.json``). This folder ships as the package
``elemta_mtahooks.schema`` so that the plugin can read them where it is installed."""
