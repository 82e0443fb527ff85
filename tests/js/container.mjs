// An unmodified AWS SDK for JavaScript v3 getting credentials from the container-credentials
// endpoint (the sidecar), then asking STS who it is.
// Usage: node container.mjs STS_ENDPOINT http|container
//   http:      fromHttp() — AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE
//   container: fromContainerMetadata() — AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN
import { GetCallerIdentityCommand, STSClient } from "@aws-sdk/client-sts";
import { fromContainerMetadata, fromHttp } from "@aws-sdk/credential-providers";

const [endpoint, provider = "http"] = process.argv.slice(2);
const providers = {
  http: () => fromHttp({ timeout: 1000, maxRetries: 1 }),
  container: () => fromContainerMetadata({ timeout: 1000, maxRetries: 1 }),
};
if (!(provider in providers)) {
  console.error(`unknown provider ${provider}: use http or container`);
  process.exit(2);
}
const client = new STSClient({ region: "us-east-1", endpoint, credentials: providers[provider]() });
const identity = await client.send(new GetCallerIdentityCommand({}));
console.log(JSON.stringify({ Account: identity.Account, Arn: identity.Arn, UserId: identity.UserId }));
