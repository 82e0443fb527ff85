// The AWS SDK for JavaScript v3 as tests/js installs it, default credential chain
// (fromNodeProviderChain): STS GetCallerIdentity at the endpoint given as the only argument.
// Prints one JSON line (what it got, or the error).
import { createRequire } from "node:module";

const require = createRequire(new URL("../../js/package.json", import.meta.url));
const { GetCallerIdentityCommand, STSClient } = require("@aws-sdk/client-sts");
const { fromNodeProviderChain } = require("@aws-sdk/credential-providers");
const version = require("@aws-sdk/client-sts/package.json").version;

const [endpoint] = process.argv.slice(2);
const result = { version };
try {
  const provider = fromNodeProviderChain();
  const credentials = await provider();
  const client = new STSClient({ endpoint, credentials: provider });
  const identity = await client.send(new GetCallerIdentityCommand({}));
  Object.assign(result, {
    arn: identity.Arn,
    // Which provider: the feature ids the SDK records for its user agent (e.g. CREDENTIALS_HTTP).
    provider: Object.keys(credentials.$source ?? {}).join(","),
    access_key: credentials.accessKeyId,
  });
  console.log(JSON.stringify(result));
} catch (error) {
  result.error = `${error.name}: ${error.message}`.replace(/\s+/g, " ").slice(0, 400);
  console.log(JSON.stringify(result));
  process.exitCode = 1;
}
