#!/bin/sh
# The compose stack's `init` service (deploy/compose.yaml): what `astra-ops dev` makes once in
# its state directory, made once in the stack's volume and kept across restarts. Readable by
# their owner only; never printed.
#   codec.keys      the payload key (ASTRA_OPS_CODEC_KEY_FILE)
#   openbao.token   the root token of the dev OpenBao (the worker's ASTRA_OPS_VAULT_TOKEN_FILE)
#   vault-sources/  where `vault-setup` may read secret files (ASTRA_OPS_VAULT_SOURCE_ROOT)
set -eu
state="${ASTRA_OPS_STATE_DIR:?the state directory}"
umask 077

# Written aside, then renamed: a half-written key is never taken for one.
if [ ! -s "$state/codec.keys" ]; then
  astra-ops keygen dev1 > "$state/codec.keys.new"
  mv "$state/codec.keys.new" "$state/codec.keys"
fi
if [ ! -s "$state/openbao.token" ]; then
  python -c 'import secrets; print("dev-" + secrets.token_hex(16))' > "$state/openbao.token.new"
  mv "$state/openbao.token.new" "$state/openbao.token"
fi
mkdir -p "$state/vault-sources"
echo "init: keys in $state"
