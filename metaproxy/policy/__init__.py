"""Tenant policies: read a directory (`read`), check each file (`check_tenant`, `check_roles`,
`fields`, `locate`) and the files together (`overlap`), load the set or refuse it with every
problem (`load`, `problems`), decide (`evaluate`), build STS parameters (`sts_params`), keep the
last good set in force (`store`), and `metaproxy policy` (`cli`)."""
