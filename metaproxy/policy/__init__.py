"""Tenant policies: read a directory (`read`), refuse files cut short (`complete`), check each
file (`check_tenant`, `check_roles`, `sharing`, `fields`, `names`, `locate`) and the files
together (`overlap`, `sharing`), load the set or refuse it with every problem (`load`,
`problems`), decide (`evaluate`), build STS parameters (`sts_params`), keep the last good set in
force (`store`), and `metaproxy policy` (`cli`)."""
