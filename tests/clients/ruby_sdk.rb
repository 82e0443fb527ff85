# The AWS SDK for Ruby (aws-sdk-core, which bundles STS), default credential chain: STS
# GetCallerIdentity at the endpoint ARGV[0]. Prints one JSON line (what it got, or the error).
require "json"
require "aws-sdk-core"

result = { "version" => Aws::CORE_GEM_VERSION }
begin
  sts = Aws::STS::Client.new(endpoint: ARGV.fetch(0))
  credentials = sts.config.credentials
  identity = sts.get_caller_identity
  result.merge!(
    "arn" => identity.arn,
    "provider" => credentials.class.name,
    "access_key" => credentials.credentials.access_key_id
  )
  puts JSON.generate(result)
rescue StandardError => e
  result["error"] = "#{e.class}: #{e.message}".split.join(" ")[0, 400]
  puts JSON.generate(result)
  exit 1
end
