// The AWS SDK for JavaScript v2 (aws-sdk), default credential chain: STS GetCallerIdentity at the
// endpoint given as the only argument. Prints one JSON line (what it got, or the error).
import AWS from "aws-sdk";

const [endpoint] = process.argv.slice(2);
const result = { version: AWS.VERSION };
try {
  const credentials = await new AWS.CredentialProviderChain().resolvePromise();
  const sts = new AWS.STS({ endpoint, credentials });
  const identity = await sts.getCallerIdentity({}).promise();
  Object.assign(result, {
    arn: identity.Arn,
    provider: credentials.constructor.name,
    access_key: credentials.accessKeyId,
  });
  console.log(JSON.stringify(result));
} catch (error) {
  result.error = `${error.name}: ${error.message}`.replace(/\s+/g, " ").slice(0, 400);
  console.log(JSON.stringify(result));
  process.exitCode = 1;
}
