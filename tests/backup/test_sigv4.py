"""AWS Signature Version 4 (epio/backup/sigv4.py) against AWS's published examples: the
aws-sig-v4-test-suite (get-vanilla, get-vanilla-query-order-key-case, post-vanilla,
get-utf8) and the worked examples of the S3 page "Signature Calculations for the
Authorization Header" (GET object with a range, PUT object, GET bucket lifecycle, GET
bucket list)."""

from __future__ import annotations

import hashlib

from twisted.trial.unittest import SynchronousTestCase

from epio.backup import sigv4

SUITE = ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "us-east-1", "service",
         "20150830T123600Z")
SUITE_HEADERS = {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"}
S3 = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1", "s3",
      "20130524T000000Z")
S3_HEADERS = {"host": "examplebucket.s3.amazonaws.com", "x-amz-date": "20130524T000000Z",
              "x-amz-content-sha256": sigv4.EMPTY_SHA256}


def signature(header: str) -> str:
    return header.rsplit("Signature=", 1)[1]


class TestSuiteVectors(SynchronousTestCase):
    def test_get_vanilla(self) -> None:
        """The whole header of get-vanilla is AWS's, character for character."""
        self.assertEqual(
            sigv4.authorization("GET", "/", [], SUITE_HEADERS, sigv4.EMPTY_SHA256, *SUITE),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
            "SignedHeaders=host;x-amz-date, "
            "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31")

    def test_query_is_sorted(self) -> None:
        """get-vanilla-query-order-key-case: parameters are signed sorted by name."""
        got = sigv4.authorization("GET", "/", [("Param2", "value2"), ("Param1", "value1")],
                                  SUITE_HEADERS, sigv4.EMPTY_SHA256, *SUITE)
        self.assertEqual(signature(got),
                         "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500")

    def test_post_vanilla(self) -> None:
        """post-vanilla: the method is part of the signature."""
        got = sigv4.authorization("POST", "/", [], SUITE_HEADERS, sigv4.EMPTY_SHA256, *SUITE)
        self.assertEqual(signature(got),
                         "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b")

    def test_utf8_path(self) -> None:
        """get-utf8: a non-ASCII path is signed (and sent) percent-encoded as UTF-8."""
        path = sigv4.encode_path("/\u1234")
        self.assertEqual(path, "/%E1%88%B4")
        got = sigv4.authorization("GET", path, [], SUITE_HEADERS, sigv4.EMPTY_SHA256, *SUITE)
        self.assertEqual(signature(got),
                         "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85")


class S3Examples(SynchronousTestCase):
    def test_get_object_with_range(self) -> None:
        """GET /test.txt with Range: the canonical request, the string to sign and the
        signature are the page's."""
        headers = {**S3_HEADERS, "range": "bytes=0-9"}
        canonical, signed = sigv4.canonical_request("GET", "/test.txt", [], headers,
                                                    sigv4.EMPTY_SHA256)
        self.assertEqual(signed, "host;range;x-amz-content-sha256;x-amz-date")
        self.assertEqual(
            sigv4.string_to_sign("20130524T000000Z", "20130524/us-east-1/s3/aws4_request",
                                 canonical),
            "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n"
            "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972")
        got = sigv4.authorization("GET", "/test.txt", [], headers, sigv4.EMPTY_SHA256, *S3)
        self.assertEqual(
            got, "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/"
            "aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
            "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")

    def test_put_object(self) -> None:
        """PUT /test$file.text with a body: the key is encoded ($ -> %24), the payload's
        hash and the storage-class header are signed."""
        body = hashlib.sha256(b"Welcome to Amazon S3.").hexdigest()
        self.assertEqual(body,
                         "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072")
        headers = {**S3_HEADERS, "x-amz-content-sha256": body,
                   "date": "Fri, 24 May 2013 00:00:00 GMT",
                   "x-amz-storage-class": "REDUCED_REDUNDANCY"}
        path = sigv4.encode_path("/test$file.text")
        self.assertEqual(path, "/test%24file.text")
        got = sigv4.authorization("PUT", path, [], headers, body, *S3)
        self.assertIn("SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;"
                      "x-amz-storage-class,", got)
        self.assertEqual(signature(got),
                         "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")

    def test_get_bucket_lifecycle(self) -> None:
        """GET /?lifecycle: a parameter without a value is signed as ``lifecycle=``."""
        got = sigv4.authorization("GET", "/", [("lifecycle", "")], S3_HEADERS,
                                  sigv4.EMPTY_SHA256, *S3)
        self.assertEqual(signature(got),
                         "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543")

    def test_list_objects(self) -> None:
        """GET /?max-keys=2&prefix=J: the listing's parameters, sorted."""
        got = sigv4.authorization("GET", "/", [("prefix", "J"), ("max-keys", "2")],
                                  S3_HEADERS, sigv4.EMPTY_SHA256, *S3)
        self.assertEqual(signature(got),
                         "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")

    def test_encoding_rules(self) -> None:
        """Query values encode everything but the unreserved characters (``+``, ``/``,
        ``=`` and space included, as an S3 upload id may hold them); header values are
        trimmed and inner spaces collapsed."""
        self.assertEqual(sigv4.canonical_query([("uploadId", "a+b/c= d~")]),
                         "uploadId=a%2Bb%2Fc%3D%20d~")
        self.assertEqual(sigv4.canonical_headers({"X-A": "  a   b  ", "Host": "h"}),
                         ("host:h\nx-a:a b\n", "host;x-a"))
