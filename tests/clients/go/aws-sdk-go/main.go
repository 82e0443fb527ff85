// aws-sdk-go (v1) with its default credential chain: STS GetCallerIdentity at the endpoint given
// as the only argument; prints one JSON line (what it got, or the error).
package main

import (
	"encoding/json"
	"os"

	"github.com/aws/aws-sdk-go/aws"
	"github.com/aws/aws-sdk-go/aws/session"
	"github.com/aws/aws-sdk-go/service/sts"
)

func report(result map[string]string, failed bool) {
	result["version"] = aws.SDKVersion
	_ = json.NewEncoder(os.Stdout).Encode(result)
	if failed {
		os.Exit(1)
	}
}

func main() {
	sess, err := session.NewSession(&aws.Config{Endpoint: aws.String(os.Args[1])})
	if err != nil {
		report(map[string]string{"error": err.Error()}, true)
	}
	creds, err := sess.Config.Credentials.Get()
	if err != nil {
		report(map[string]string{"error": err.Error()}, true)
	}
	identity, err := sts.New(sess).GetCallerIdentity(&sts.GetCallerIdentityInput{})
	if err != nil {
		report(map[string]string{"error": err.Error(), "provider": creds.ProviderName}, true)
	}
	report(map[string]string{
		"arn":        aws.StringValue(identity.Arn),
		"access_key": creds.AccessKeyID,
		"provider":   creds.ProviderName,
	}, false)
}
