// An unmodified AWS SDK for JavaScript v3 getting credentials from IMDS (the sidecar), then
// asking STS who it is. Usage: node imds.mjs STS_ENDPOINT
// The IMDS endpoint comes from AWS_EC2_METADATA_SERVICE_ENDPOINT, as in any SDK deployment.
import { GetCallerIdentityCommand, STSClient } from "@aws-sdk/client-sts";
import { fromInstanceMetadata } from "@aws-sdk/credential-providers";

const [endpoint] = process.argv.slice(2);
const client = new STSClient({
  region: "us-east-1",
  endpoint,
  credentials: fromInstanceMetadata({ timeout: 1000, maxRetries: 1 }),
});
const identity = await client.send(new GetCallerIdentityCommand({}));
console.log(JSON.stringify({ Account: identity.Account, Arn: identity.Arn, UserId: identity.UserId }));
